"""`python -m llama_dist.bench serve --stall_prompt_len`: the long prompt admitted while streams run, on a tiny
random checkpoint with the bundled tokenizer's vocabulary (random weights seldom stop, unlike the bundled model)."""

from __future__ import annotations

import pytest

pytest.importorskip("httpx")

from llama_dist.bench.decode import make_checkpoint  # noqa: E402
from llama_dist.bench.serve import flag_value, load_test, merge_flags  # noqa: E402
from llama_dist.checkpoint.formats import find_tokenizer  # noqa: E402
from llama_dist.cli import default_checkpoint  # noqa: E402


def test_server_flags_replace_the_bench_defaults():
    flags = merge_flags(["--ckpt_dir", "x", "--max_batch_size", "16", "--max_seq_len", "64"],
                        ["--max_seq_len=2048", "--max_num_seqs", "8", "--max_num_batched_tokens", "64"])
    assert flags == ["--ckpt_dir", "x", "--max_seq_len=2048", "--max_num_seqs", "8", "--max_num_batched_tokens", "64"]
    assert (flag_value(flags, "max_seq_len"), flag_value(flags, "max_num_batched_tokens")) == (2048, 64)
    assert flag_value(flags, "max_batch_size") is None


def test_long_prompt_admitted_mid_stream(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = tmp_path / "ckpt"
    make_checkpoint(str(ckpt), dim=64, n_layers=1, vocab_size=512, dtype="float32")
    capsys.readouterr()
    load_test(str(ckpt), nproc=1, clients=0, max_batch_size=3, prompt_len=8, lone_requests=1, dtype="float32",
              tokenizer_path=str(find_tokenizer(default_checkpoint())), max_num_batched_tokens=8,
              stall_prompt_len=64, stall_clients=2, log_dir=str(tmp_path))
    out = capsys.readouterr().out
    print(out)
    assert "then one 64-token prompt; budget 8 tokens a step: about 11 prefill chunks" in out
    assert "Long request: time to first token" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert int(rows["all, whole window"][0]) > 0
    for label in ("before the long prompt", "ending while it is admitted (sent -> its first token)"):
        assert label in rows
