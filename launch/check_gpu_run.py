"""The dry run of `launch/run_on_gpu.sh` on a machine without a GPU: what can fail there without a GPU, checked here.

    python launch/check_gpu_run.py [--site DIR] [--tokenizer FILE] -- COMMAND ...

- with --site (the scratch directory the carried wheels were installed to with `pip install --target`): each
  package installed there imports from there, and llama_dist's modules that need them import;
- each COMMAND (one shell-quoted string, as the script runs it; leading VAR=value words are its environment)
  resolves: `python -m MODULE` names a module; `-m llama_dist.bench SUB` a subcommand whose function takes every
  flag given (fire's --name value, --name=value, --noname), a random:NAME checkpoint a known preset;
  `-m pytest ... PATH` collects PATH;
- --tokenizer names a file.

Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def carried_packages(site: Path) -> list[str]:
    """The top-level modules the wheels installed in `site` hold (from their RECORD files)."""
    names = set()
    for record in site.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            top = line.split(",", 1)[0].split("/", 1)[0]
            if top.endswith((".dist-info", ".data")) or top in ("", "..", "bin", "__pycache__"):
                continue
            names.add(top.removesuffix(".py"))
    return sorted(n for n in names if n.isidentifier())


def check_site(site: Path) -> list[str]:
    """Problems importing the carried packages from `site` (and llama_dist's modules that use them)."""
    problems = []
    sys.path.insert(0, str(site))
    for name in carried_packages(site):
        if name == "llama_models":  # carried for its Llama 3 tokenizer file only (its own dependencies are not)
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not only the first
            problems.append(f"{name}: does not import from {site}: {type(exc).__name__}: {exc}")
            continue
        where = Path(getattr(module, "__file__", "") or "")
        if site not in where.parents:
            problems.append(f"{name}: imported from {where}, not from the carried wheels in {site}")
    for name in ("llama_dist.cli", "llama_dist.serve.api", "llama_dist.bench.__main__", "llama_dist.bench.serve"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name}: does not import: {type(exc).__name__}: {exc}")
    return problems


def _flags(args: list[str]) -> list[str]:
    """The flag names of fire-style arguments (--name value, --name=value, --noname, --name)."""
    return [arg[2:].split("=", 1)[0].replace("-", "_") for arg in args if arg.startswith("--")]


def check_bench(args: list[str]) -> list[str]:
    """Problems with `python -m llama_dist.bench ARGS`."""
    from llama_dist.bench.__main__ import commands
    from llama_dist.checkpoint.formats import open_reader
    from llama_dist.checkpoint.random_reader import is_random_checkpoint

    functions = commands()
    if not args or args[0] not in functions:
        return [f"bench subcommand {args[:1]} is not one of {sorted(functions)}"]
    parameters = inspect.signature(functions[args[0]]).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    problems = []
    for flag in _flags(args[1:]):
        known = flag in parameters or (flag.startswith("no") and flag[2:] in parameters)
        if not (known or takes_any):
            problems.append(f"bench {args[0]}: no flag --{flag}")
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_dir=") else (
            args[i + 1] if arg == "--ckpt_dir" and i + 1 < len(args) else None)
        if value is not None and is_random_checkpoint(value):
            try:
                open_reader(value)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"bench {args[0]}: {exc}")
    return problems


def check_pytest(args: list[str]) -> list[str]:
    """Problems collecting the paths of `python -m pytest ARGS`."""
    import pytest

    paths = [a for a in args if not a.startswith("-")]
    missing = [p for p in paths if not (REPO / p).exists()]
    if missing:
        return [f"pytest: {missing} not found"]
    code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *[str(REPO / p) for p in paths]])
    return [] if code == 0 else [f"pytest: collecting {paths} exited {code}"]


def check_command(command: str) -> list[str]:
    """Problems with one command line of the GPU run."""
    words = shlex.split(command)
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        words = words[1:]  # VAR=value: the command's environment
    if words[:1] == ["env"]:
        words = words[1:]
        while words and "=" in words[0]:
            words = words[1:]
    if len(words) < 3 or words[1] != "-m":
        return [f"not a `python -m MODULE` command: {command}"]
    module, args = words[2], words[3:]
    if importlib.util.find_spec(module) is None:
        return [f"no module {module}"]
    if module == "llama_dist.bench":
        return check_bench(args)
    if module == "pytest":
        return check_pytest(args)
    return []


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, help="where the carried wheels were installed (pip --target)")
    parser.add_argument("--tokenizer", type=Path, help="the tokenizer file the server load test is given")
    parser.add_argument("commands", nargs="*")
    options = parser.parse_args(argv)
    failed = False

    def report(what: str, problems: list[str]) -> None:
        nonlocal failed
        failed |= bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {what}" + "".join(f"\n     {p}" for p in problems), flush=True)

    if options.site is not None:
        report(f"the carried packages import from {options.site}", check_site(options.site.resolve()))
    if options.tokenizer is not None:
        report(f"tokenizer {options.tokenizer}", [] if options.tokenizer.is_file() else ["not a file"])
    for command in options.commands:
        report(command, check_command(command))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
