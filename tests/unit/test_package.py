"""The package's shape: folders that show the architecture, no import cycles (of modules or of folders), a light
`import llama_dist`, and every run flag declared once with one default."""

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from llama_dist import cli
from llama_dist.checkpoint.loader import open_checkpoint
from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN
from llama_dist.llm import Llama
from llama_dist.model.llama import Transformer

PACKAGE = Path(__file__).resolve().parents[2] / "llama_dist"


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
    assert "llama_dist.checkpoint.loader" in graph["llama_dist.llm"]  # the graph is really read
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


def _folder(module: str) -> str:
    """The folder (subpackage) a module lives in; a root module is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_folders_do_not_import_each_other_in_a_cycle():
    edges: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        for target in targets:
            if _folder(target) != _folder(module):
                edges.setdefault(_folder(module), set()).add(_folder(target))
    assert "llama_dist.model" in edges["llama_dist.checkpoint"]  # the graph is really read
    state: dict[str, str] = {}

    def visit(folder: str, path: list[str]) -> None:
        state[folder] = "open"
        for target in edges.get(folder, ()):
            assert state.get(target) != "open", "folders import each other: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[folder] = "done"

    for folder in list(edges):
        if folder not in state:
            visit(folder, [folder])


def test_the_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root
    assert {"model", "engine", "text", "checkpoint", "dist", "serve", "bench"} <= {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
    }


def test_import_llama_dist_stays_light():
    code = ("import sys, llama_dist; from llama_dist import Llama, Transformer; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'httpx', 'transformers', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_never_imports_the_tests():
    test_modules = {p.stem for p in PACKAGE.parent.joinpath("tests").rglob("*.py")} | {"tests", "conftest"}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in test_modules, f"{path} imports {name} from tests/"


def test_the_model_knows_nothing_of_files():
    model_imports = set().union(*(t for m, t in _imports().items() if m.startswith("llama_dist.model")))
    assert not {m for m in model_imports if m.startswith("llama_dist.checkpoint")}


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_command_lists_every_run_flag(command, capfd):
    with pytest.raises(SystemExit) as exit_info:  # fire ends a --help with SystemExit(0)
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    err = capfd.readouterr().err
    for field in dataclasses.fields(cli.RunOptions):
        assert f"--{field.name}" in err, field.name  # fire writes help to stderr


def test_one_default_for_each_runtime_limit():
    options = cli.RunOptions()
    for function in (Llama.build, open_checkpoint, Transformer.post_init):
        parameters = inspect.signature(function).parameters
        assert options.max_seq_len == parameters["max_seq_len"].default == DEFAULT_MAX_SEQ_LEN, function
        assert options.max_batch_size == parameters["max_batch_size"].default == DEFAULT_MAX_BATCH_SIZE, function
    completion = inspect.signature(Llama.text_completion).parameters
    assert options.max_gen_len is completion["max_gen_len"].default is None
    assert (options.temperature, options.top_p) == (completion["temperature"].default, completion["top_p"].default)
