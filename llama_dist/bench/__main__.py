"""`python -m llama_dist.bench run|make-checkpoint|quality|kernels|cache|guided|spec|serve ...` (under torchrun for N
ranks)."""

import sys

import fire


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:  # the server's load test starts its own servers: it takes its own flags
        from llama_dist.bench.serve import main as serve_main

        serve_main(argv[1:])
        return
    from llama_dist.bench.cache import run as cache
    from llama_dist.bench.decode import COMMANDS
    from llama_dist.bench.guided import run as guided
    from llama_dist.bench.speculative import run as speculative

    fire.Fire({**COMMANDS, "cache": cache, "guided": guided, "spec": speculative}, command=argv,
              name="python -m llama_dist.bench")


if __name__ == "__main__":
    main(sys.argv[1:])
