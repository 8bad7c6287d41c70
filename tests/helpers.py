"""Shared test support: small random Meta checkpoints, an independent reference Llama, rank workers.

Workers are module-level functions so `run_local` can start them in spawned rank processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_dist.checkpoint.consolidated import write_consolidated
from llama_dist.checkpoint.loader import load_model
from llama_dist.config import RUNTIME_FIELDS, ModelArgs
from llama_dist.dist.groups import init_distributed
from llama_dist.model.weights import random_weights

# The vocabulary of the conftest SentencePiece model: divisible by 1, 2, 3, 4 and 6 ranks.
SPM_VOCAB = 384


def raises_naming(exc_type, *names):
    """pytest.raises(exc_type) whose message must contain every one of `names` (paths, values, tensor names)."""
    return pytest.raises(exc_type, match="(?s)" + "".join(f"(?=.*{re.escape(str(n))})" for n in names))


def edit_params(ckpt_dir, **changes):
    path = ckpt_dir / "params.json"
    params = json.loads(path.read_text())
    params.update(changes)
    path.write_text(json.dumps(params))


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, multiple_of=32, norm_eps=1e-5,
                rope_theta=10000.0)
    base.update(overrides)
    return ModelArgs(**base)


def params_of(args: ModelArgs) -> dict:
    """What a checkpoint's params.json holds for `args`: every field but the runtime ones."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in RUNTIME_FIELDS}


class RunsShellCommand:
    """Unpickling this object runs a shell command: what a malicious .pth file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def shorten_storage_record(path: Path, key: str = "0") -> None:
    """Rewrite the torch.save zip at `path` so storage record `key` holds half the bytes its header declares:
    a memory-mapped load then reads the rest of that tensor from whatever follows the record."""
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries:
            dst.writestr(name, data[: len(data) // 2] if name.endswith(f"/data/{key}") else data)


def write_checkpoint(out_dir: Path, args: ModelArgs, num_shards: int = 1, family: str = "llama3", seed: int = 0):
    """A random checkpoint in Meta's layout. Llama 2 style: embedding split by width, rope.freqs, vocab -1."""
    weights = random_weights(args, seed=seed)
    params = params_of(args)
    if family == "llama2":
        params["vocab_size"] = -1
        weights["rope.freqs"] = torch.randn(args.head_dim // 2)
    write_consolidated(weights, params, out_dir, num_shards, embedding_split_dim=1 if family == "llama2" else 0)
    weights.pop("rope.freqs", None)
    return weights


def reference_logits(weights: dict[str, torch.Tensor], args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence float64 Llama forward from unsplit weights, written independently of llama_dist.model.llama.

    Uses complex-number RoPE and explicit head repetition, as Meta's paper-level description does.
    """
    w = {k: v.double() for k, v in weights.items()}
    bsz, seqlen = tokens.shape
    hd, nh, nkv = args.head_dim, args.n_heads, args.n_kv_heads

    def norm(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * gain

    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).double() / hd))
    if args.use_scaled_rope:
        wavelen = 2 * math.pi / freqs
        smooth = (8192 / wavelen - 1) / 3
        freqs = torch.where(
            wavelen < 8192 / 4, freqs,
            torch.where(wavelen > 8192, freqs / 8, (1 - smooth) * freqs / 8 + smooth * freqs),
        )
    rot = torch.polar(torch.ones(seqlen, hd // 2, dtype=torch.float64), torch.outer(torch.arange(seqlen).double(), freqs))

    def rope(x):  # (b, s, h, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)

    h = w["tok_embeddings.weight"][tokens]
    causal = torch.full((seqlen, seqlen), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).view(bsz, seqlen, nh, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(bsz, seqlen, nkv, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(bsz, seqlen, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, seqlen, nh * hd)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        gate = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + gate @ w[p + "feed_forward.w2.weight"].T
    return (norm(h, w["norm.weight"]) @ w["output.weight"].T).float()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference `b`."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def logits_worker(jobs: list[dict]) -> list[dict]:
    """On each rank: for every job load `ckpt` and return full-sequence and prefill+decode logits.

    job: {"ckpt": dir, "tokens": LongTensor, "dtype": torch dtype (default float32), "decode_from": int | None}
    """
    init_distributed()
    results = []
    for job in jobs:
        tokens = job["tokens"]
        model = load_model(job["ckpt"], max_seq_len=48, max_batch_size=3, dtype=job.get("dtype", torch.float32))
        out = {"full": model(tokens, 0).logits}
        split = job.get("decode_from")
        if split is not None:
            # Prefill the first `split` positions, then one token at a time through the KV cache.
            steps = [model(tokens[:, :split], 0).logits]
            for pos in range(split, tokens.shape[1]):
                steps.append(model(tokens[:, pos : pos + 1], pos).logits)
            out["incremental"] = torch.cat(steps, dim=1)
        results.append(out)
    return results


# ---- the command line in tests (tests/e2e) --------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`llama-dist ARGV` in this process: (exit status, stdout, stderr)."""
    from llama_dist import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_env() -> dict[str, str]:
    """The environment of a command run as a subprocess: no launcher variables of ours, the repository importable."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", LLAMA_DIST_TIMEOUT="600")
    return env
