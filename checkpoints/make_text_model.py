#!/usr/bin/env python
"""Make a small Llama trained on English prose, for measurements that need a model whose outputs mean something
(quantization quality): 5M parameters trained for ~7 minutes on two CPU cores (bf16 matmuls).

    python checkpoints/make_text_model.py [--out bench_out/text_model]

The text is what every Python installation carries: the docstrings of the standard library (modules, classes,
functions; tests and GUI packages left out) and the language reference topics of `pydoc_data`, one paragraph a
document. Every seventh reference topic is held out of training and written to `<out>/heldout.txt` (a paragraph
a line), the text `python -m llama_dist.bench quality --text_file` reads. Writes `params.json`,
`consolidated.00.pth` (bfloat16) and `tokenizer.model` (SentencePiece BPE, 4096 tokens) like make_tiny.py,
whose training loop it shares. Not committed (a few MB of weights): run it to reproduce the figures in
docs/performance.md. The corpus depends on the Python version (3.11 here).
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
import time
from pathlib import Path

import make_tiny
import torch

SEED = 2024
VOCAB_SIZE = 4096
MODEL_SHAPE = {
    "dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, "norm_eps": 1e-5, "rope_theta": 10000.0,
}
MAX_SEQ_LEN = 256
# Parts of the standard library whose docstrings are not prose about Python: tests, GUI demos, vendored code.
SKIPPED = {"test", "tests", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip"}


def _paragraphs(text: str) -> list[str]:
    paragraphs = (" ".join(p.split()) for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p) >= 60 and not p.startswith(">>>")]


def docstring_paragraphs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}  # ordered and without repeats (inherited docstrings recur)
    for path in sorted(root.rglob("*.py")):
        if SKIPPED & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(dict.fromkeys(_paragraphs(ast.get_docstring(node) or "")))
    return list(found)


def reference_paragraphs() -> tuple[list[str], list[str]]:
    """(training, held out): every seventh topic of the language reference, whole, is held out."""
    from pydoc_data.topics import topics

    train, held_out = [], []
    for i, name in enumerate(sorted(topics)):
        (held_out if i % 7 == 3 else train).extend(_paragraphs(topics[name]))
    return train, held_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/text_model")
    parser.add_argument("--minutes", type=float, default=15.0, help="safety cap on the whole run")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=MAX_SEQ_LEN)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    deadline = start + 60 * args.minutes - 30
    random.seed(SEED)
    torch.manual_seed(SEED)

    from llama_dist.checkpoint.consolidated import write_consolidated
    from llama_dist.config import ModelArgs
    from llama_dist.dist.groups import init_distributed
    from llama_dist.text.tokenizer import load_tokenizer, train_llama2_style_tokenizer

    init_distributed(backend="gloo", device="cpu")  # a 1-rank group: fairscale's layers need one
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reference, held_out = reference_paragraphs()
    docs = docstring_paragraphs() + reference
    random.Random(SEED).shuffle(docs)
    (out / "heldout.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    train_llama2_style_tokenizer(docs, VOCAB_SIZE, out / "tokenizer.model")
    tokenizer = load_tokenizer(out / "tokenizer.model")

    tokens, doc_starts = make_tiny.token_stream(tokenizer, docs)
    held_out_tokens = sum(len(tokenizer.encode(p, bos=True, eos=True)) for p in held_out)
    print(f"corpus: {len(docs)} paragraphs, {len(tokens)} tokens; held out: {len(held_out)} paragraphs, "
          f"{held_out_tokens} tokens", flush=True)

    model_args = ModelArgs(**MODEL_SHAPE, vocab_size=VOCAB_SIZE)
    # bf16 matmuls (AMX where the CPU has it), float32 weights
    model = make_tiny.train(args, tokens, doc_starts, model_args, deadline, bf16=True)

    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    params = {k: MODEL_SHAPE[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "norm_eps",
                                          "rope_theta")}
    write_consolidated(weights, dict(params, vocab_size=VOCAB_SIZE), out, num_shards=1)
    print(f"saved {out}; total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
