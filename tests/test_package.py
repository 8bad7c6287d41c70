"""The package's shape: no import cycles, and every run flag declared once with one default."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from llama_dist import cli
from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, ModelArgs
from llama_dist.generation import Llama

PACKAGE = Path(__file__).resolve().parents[1] / "llama_dist"


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module or function level."""
    modules = {p: ".".join(("llama_dist",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    names = set(modules.values())
    graph = {}
    for path, module in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in candidates:
                while name and name not in names:
                    name = name.rpartition(".")[0]
                if name and name not in (module, "llama_dist"):
                    targets.add(name)
        graph[module] = targets
    return graph


def test_no_import_cycles():
    graph = _imports()
    assert "llama_dist.loading" in graph["llama_dist.generation"]  # the graph is really read
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_model_knows_nothing_of_files():
    assert not {m for m in _imports()["llama_dist.model"] if m.startswith(("llama_dist.loading", "llama_dist.formats"))}


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_command_lists_every_run_flag(command, capfd):
    with pytest.raises(SystemExit) as exit_info:  # fire ends a --help with SystemExit(0)
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    err = capfd.readouterr().err
    for field in dataclasses.fields(cli.RunOptions):
        assert f"--{field.name}" in err, field.name  # fire writes help to stderr


def test_one_default_for_each_runtime_limit():
    build = inspect.signature(Llama.build).parameters
    options = cli.RunOptions()
    assert options.max_seq_len == build["max_seq_len"].default == ModelArgs().max_seq_len == DEFAULT_MAX_SEQ_LEN
    assert options.max_batch_size == build["max_batch_size"].default == ModelArgs().max_batch_size == DEFAULT_MAX_BATCH_SIZE
    completion = inspect.signature(Llama.text_completion).parameters
    assert options.max_gen_len is completion["max_gen_len"].default is None
    assert (options.temperature, options.top_p) == (completion["temperature"].default, completion["top_p"].default)
