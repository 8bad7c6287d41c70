"""`python -m llama_dist.bench run|make-checkpoint|quality|kernels|cache|guided|spec|serve ...` (under torchrun for N
ranks)."""

import sys

import fire


def commands(serve: bool = True) -> dict:
    """Every subcommand's function, by name: fire hands each its flags (`serve` parses them itself, for the same
    function; serve=False leaves it out, and the HTTP client stack it imports)."""
    from llama_dist.bench.cache import run as cache
    from llama_dist.bench.decode import COMMANDS
    from llama_dist.bench.guided import run as guided
    from llama_dist.bench.speculative import run as speculative

    named = {**COMMANDS, "cache": cache, "guided": guided, "spec": speculative}
    if serve:
        from llama_dist.bench.serve import load_test

        named["serve"] = load_test
    return named


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:  # the server's load test starts its own servers: it takes its own flags
        from llama_dist.bench.serve import main as serve_main

        serve_main(argv[1:])
        return
    fire.Fire(commands(serve=False), command=argv, name="python -m llama_dist.bench")


if __name__ == "__main__":
    main(sys.argv[1:])
