"""Command line: `python -m llama_dist generate|chat ...` (also installed as `llama-dist`).

The same command runs as one process, under `torchrun --nproc_per_node N`, or under `srun`: every rank runs
it, rank 0 reads the input and prints, the others compute their slice of the model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch.distributed as dist

from llama_dist.chat import DialogError
from llama_dist.checkpoint import CheckpointError
from llama_dist.config import ConfigError
from llama_dist.distributed import (
    RemoteRankError,
    init_distributed,
    is_main_process,
    long_wait_group,
    on_main_then_share,
    print0,
    read_launch_env,
    shutdown_distributed,
)
from llama_dist.generation import Llama, RequestError

# Errors a user can fix from the message alone: shown as one line on rank 0 instead of a traceback.
USER_ERRORS = (
    RequestError, DialogError, CheckpointError, ConfigError, RemoteRankError, FileNotFoundError, ValueError, TypeError
)
REPO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"
INSTALLED_CHECKPOINT = Path(sys.prefix) / "share" / "llama_dist" / "checkpoints" / "tiny"


def default_checkpoint() -> Path:
    """The bundled tiny model: from the source tree, or where `pip install` put it."""
    for candidate in (REPO_CHECKPOINT, INSTALLED_CHECKPOINT):
        if (candidate / "params.json").is_file():
            return candidate
    raise FileNotFoundError(f"no --ckpt_dir given and the bundled model is not at {REPO_CHECKPOINT}")


def resolve_paths(ckpt_dir, tokenizer_path) -> tuple[Path, Path]:
    """Meta ships tokenizer.model inside the checkpoint dir (Llama 3) or beside it (Llama 2)."""
    ckpt = Path(ckpt_dir) if ckpt_dir else default_checkpoint()
    if tokenizer_path:
        return ckpt, Path(tokenizer_path)
    for candidate in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model"):
        if candidate.is_file():
            return ckpt, candidate
    raise FileNotFoundError(f"no tokenizer.model in or beside {ckpt}: pass --tokenizer_path")


def _read_prompts(prompt, prompts_file) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if prompt is not None:
        return [str(prompt)]
    lines = [line.rstrip("\n") for line in Path(prompts_file).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{prompts_file} has no non-empty lines")
    return prompts


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate(
    prompt: str | None = None,
    prompts_file: str | None = None,
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    max_gen_len: int = 64,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    dtype: str | None = None,
    logprobs: bool = False,
    echo: bool = False,
    seed: int = 1,
    verify_checksums: bool = False,
    timeout_s: float | None = None,
):
    """Complete --prompt TEXT, or each line of --prompts_file (in batches of --max_batch_size).

    With no --ckpt_dir the bundled tiny model is used. --dtype: float32, bfloat16 or float16 (default:
    bfloat16 on CUDA, float32 on CPU). --temperature 0 is greedy decoding.
    --verify_checksums: check the files against the checkpoint's checklist.chk (md5) before loading.
    --timeout_s: seconds a rank waits in a collective for its peers before the job fails (default:
    $LLAMA_DIST_TIMEOUT, else 600); it must cover the slowest rank's loading.
    """
    init_distributed(timeout_s=timeout_s)  # first (it sets the group's timeout); only rank 0 reads and reports
    prompts = on_main_then_share(_read_prompts, prompt, prompts_file)
    ckpt, tokenizer = on_main_then_share(resolve_paths, ckpt_dir, tokenizer_path)
    llm = Llama.build(
        ckpt, tokenizer, max_seq_len, max_batch_size, dtype=dtype, seed=seed, timeout_s=timeout_s,
        verify_checksums=verify_checksums,
    )
    generated, seconds = 0, 0.0
    for batch in _batches(prompts, max_batch_size):
        start = time.perf_counter()
        results = llm.text_completion(batch, temperature, top_p, max_gen_len, logprobs=logprobs, echo=echo)
        seconds += time.perf_counter() - start
        generated += llm.last_stats.generated_tokens
        for text, result in zip(batch, results):
            print0(f"> {text}")
            print0(result["generation"])
            if logprobs:
                pairs = " ".join(f"{tok!r}:{lp:.3f}" for tok, lp in zip(result["tokens"], result["logprobs"]))
                print0(f"  logprobs: {pairs}")
            print0()
    print0(f"[{len(prompts)} prompt(s), {generated} tokens in {seconds:.2f} s, {generated / max(seconds, 1e-9):.1f} tok/s]")


def _read_user_turn() -> str | None:
    try:
        line = input("user> ")
    except EOFError:
        return None
    return None if line.strip() in ("exit", "quit") else line


def chat(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    dialogs_file: str | None = None,
    system: str | None = None,
    max_gen_len: int | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    dtype: str | None = None,
    seed: int = 1,
    verify_checksums: bool = False,
    timeout_s: float | None = None,
):
    """Chat interactively on rank 0 (answers stream; 'exit' or Ctrl-D ends), or answer --dialogs_file.

    --dialogs_file: JSON list of dialogs, each a list of {"role": "system"|"user"|"assistant", "content": str}.
    --verify_checksums and --timeout_s: as for `generate`. --timeout_s bounds the collectives of generation,
    not the time the user takes to type: an interactive chat may sit idle for days.
    """
    init_distributed(timeout_s=timeout_s)
    dialogs = on_main_then_share(lambda: json.loads(Path(dialogs_file).read_text()) if dialogs_file else None)
    ckpt, tokenizer = on_main_then_share(resolve_paths, ckpt_dir, tokenizer_path)
    llm = Llama.build(
        ckpt, tokenizer, max_seq_len, max_batch_size, dtype=dtype, seed=seed, timeout_s=timeout_s,
        verify_checksums=verify_checksums,
    )
    if dialogs is not None:
        for batch in _batches(dialogs, max_batch_size):
            for dialog, result in zip(batch, llm.chat_completion(batch, temperature, top_p, max_gen_len)):
                for message in dialog:
                    print0(f"{message['role']}> {message['content']}")
                print0(f"assistant> {result['generation']['content']}\n")
        return
    dialog = [{"role": "system", "content": system}] if system else []
    print0("Chat with the model; 'exit' or Ctrl-D ends.")
    turn_group = long_wait_group()  # the other ranks wait for the user's turn here, unbounded by timeout_s
    while (line := on_main_then_share(_read_user_turn, group=turn_group)) is not None:
        dialog.append({"role": "user", "content": line})
        answer = []
        if is_main_process():
            print("assistant> ", end="", flush=True)
        try:
            for piece in llm.chat_stream(dialog, temperature, top_p, max_gen_len):
                answer.append(piece)
                if is_main_process():
                    print(piece, end="", flush=True)
        except RequestError as exc:  # the conversation outgrew max_seq_len: start afresh, keep the system prompt
            print0(f"\n[{exc}; starting a new conversation]")
            dialog = dialog[:1] if system else []
            continue
        print0()
        dialog.append({"role": "assistant", "content": "".join(answer)})


def lost_contact(exc: BaseException) -> bool:
    """A peer died or a collective timed out: torch's DistError, or the RuntimeError gloo raises for it."""
    words = ("connection", "timed out", "timeout", "broken pipe", "peer")
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in words)
    )


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for an error the user can fix (one line on rank 0), 1 when this rank lost contact
    with another (a peer died, or a collective outlived the timeout: one line on every surviving rank)."""
    try:
        fire.Fire({"generate": generate, "chat": chat}, command=argv, name="llama-dist")
        return 0
    except USER_ERRORS as exc:
        if is_main_process():
            print(f"llama-dist: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        rank = dist.get_rank() if dist.is_initialized() else read_launch_env().rank
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"llama-dist: error: rank {rank} lost contact with another rank ({first_line})", file=sys.stderr,
              flush=True)
        return 1
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
