"""Command line: `python -m llama_dist generate|chat|convert ...` (also installed as `llama-dist`).

The same command runs as one process, under `torchrun --nproc_per_node N`, or under `srun`: every rank runs
it, rank 0 reads the input and prints, the others compute their slice of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fire
import torch.distributed as dist

from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN
from llama_dist.convert import convert
from llama_dist.distributed import (
    init_distributed,
    is_main_process,
    long_wait_group,
    on_main_then_share,
    print0,
    read_launch_env,
    shutdown_distributed,
)
from llama_dist.errors import LlamaDistError, RequestError
from llama_dist.formats.consolidated import write_quantized
from llama_dist.generation import Llama
from llama_dist.quant import DEFAULT_INT4_GROUP_SIZE, make_scheme

# Errors a user can fix from the message alone: shown as one line on rank 0 instead of a traceback. Besides
# the project's own, only the file-system errors of paths the user gave.
USER_ERRORS = (LlamaDistError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
REPO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"
INSTALLED_CHECKPOINT = Path(sys.prefix) / "share" / "llama_dist" / "checkpoints" / "tiny"


@dataclass(frozen=True)
class RunOptions:
    """The flags every command takes: which model, how the ranks run it, how it samples."""

    ckpt_dir: str | None = None
    tokenizer_path: str | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    dtype: str | None = None
    seed: int = 1
    verify_checksums: bool = False
    timeout_s: float | None = None
    max_gen_len: int | None = None
    temperature: float = 0.6
    top_p: float = 0.9
    quantize: str | None = None
    int4_group_size: int = DEFAULT_INT4_GROUP_SIZE
    keep_output_precision: bool = False

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len)


# Continues the "Args:" section of each command's docstring, which fire shows under each flag.
RUN_OPTIONS_HELP = """\
        ckpt_dir: a Meta or Hugging Face checkpoint directory (default: the bundled tiny model)
        tokenizer_path: default: the tokenizer.model or tokenizer.json in or beside the checkpoint directory
        max_seq_len: positions per sequence, prompt + generation; generation is cut where it ends
        max_batch_size: sequences decoded together
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)
        seed: rank 0's sampling seed
        verify_checksums: check the files against the checkpoint's checklist.chk (md5) before loading
        timeout_s: seconds a rank waits in a collective for its peers before the job fails (default:
            $LLAMA_DIST_TIMEOUT, else 600); it must cover the slowest rank's loading
        max_gen_len: tokens to generate at most (default: until a stop token or max_seq_len)
        temperature: 0 is greedy decoding
        top_p: nucleus sampling: sample among the most likely tokens that make up this probability mass
        quantize: int8 or int4: weight-only quantization of the matmul weights, each rank its own slice at load
            (a checkpoint saved by `llama-dist quantize` loads quantized without it)
        int4_group_size: input values per int4 scale and zero: 32, 64 or 128
        keep_output_precision: keep the output projection in the model dtype when quantizing
"""


def command(fn):
    """`fn(own flags..., options)` as a fire command taking its own flags and every RunOptions field as flags."""
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "options"]
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.type)
        for f in dataclasses.fields(RunOptions)
    ]
    signature = inspect.Signature(own + shared)
    own_names = {p.name for p in own}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flags = bound.arguments
        options = RunOptions(**{k: v for k, v in flags.items() if k not in own_names})
        return fn(**{k: v for k, v in flags.items() if k in own_names}, options=options)

    run.__signature__ = signature  # what fire reads to list and parse the flags
    run.__doc__ = f"{fn.__doc__.rstrip()}\n{RUN_OPTIONS_HELP}"
    return run


def default_checkpoint() -> Path:
    """The bundled tiny model: from the source tree, or where `pip install` put it."""
    for candidate in (REPO_CHECKPOINT, INSTALLED_CHECKPOINT):
        if (candidate / "params.json").is_file():
            return candidate
    raise FileNotFoundError(f"no --ckpt_dir given and the bundled model is not at {REPO_CHECKPOINT}")


def start(options: RunOptions, read_input, *args):
    """Start the process group (once, with the flags' timeout), read the command's input on rank 0 (before
    anything loads, so a bad input fails fast), and build the model: (Llama, input) on every rank."""
    context = init_distributed(timeout_s=options.timeout_s)
    user_input = on_main_then_share(read_input, *args)
    ckpt = on_main_then_share(lambda: Path(options.ckpt_dir) if options.ckpt_dir else default_checkpoint())
    llm = Llama.build(
        ckpt, options.tokenizer_path, options.max_seq_len, options.max_batch_size, dtype=options.dtype,
        seed=options.seed, verify_checksums=options.verify_checksums, context=context, quantize=options.quantize,
        int4_group_size=options.int4_group_size, keep_output_precision=options.keep_output_precision,
    )
    return llm, user_input


def _read_prompts(prompt, prompts_file) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise RequestError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if prompt is not None:
        return [str(prompt)]
    lines = [line.rstrip("\n") for line in Path(prompts_file).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise RequestError(f"{prompts_file} has no non-empty lines")
    return prompts


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@command
def generate(prompt: str | None = None, prompts_file: str | None = None, logprobs: bool = False,
             echo: bool = False, *, options: RunOptions):
    """Complete --prompt TEXT, or each line of --prompts_file (in batches of --max_batch_size).

    Args:
        prompt: the text to complete
        prompts_file: a file of prompts, one per line
        logprobs: also print each generated token's log-probability
        echo: print the prompt's tokens before the generated ones
    """
    llm, prompts = start(options, _read_prompts, prompt, prompts_file)
    generated, seconds = 0, 0.0
    for batch in _batches(prompts, options.max_batch_size):
        started = time.perf_counter()
        results = llm.text_completion(batch, **options.sampling(), logprobs=logprobs, echo=echo)
        seconds += time.perf_counter() - started
        generated += llm.last_stats.generated_tokens
        for text, result in zip(batch, results):
            print0(f"> {text}")
            print0(result["generation"])
            if logprobs:
                pairs = " ".join(f"{tok!r}:{lp:.3f}" for tok, lp in zip(result["tokens"], result["logprobs"]))
                print0(f"  logprobs: {pairs}")
            print0()
    print0(f"[{len(prompts)} prompt(s), {generated} tokens in {seconds:.2f} s, {generated / max(seconds, 1e-9):.1f} tok/s]")


def _read_dialogs(dialogs_file):
    return json.loads(Path(dialogs_file).read_text()) if dialogs_file else None


def _read_user_turn() -> str | None:
    try:
        line = input("user> ")
    except EOFError:
        return None
    return None if line.strip() in ("exit", "quit") else line


@command
def chat(dialogs_file: str | None = None, system: str | None = None, *, options: RunOptions):
    """Chat interactively on rank 0 (answers stream; 'exit' or Ctrl-D ends), or answer --dialogs_file.

    --timeout_s bounds the collectives of generation, not the time the user takes to type: an interactive chat
    may sit idle for days.

    Args:
        dialogs_file: JSON list of dialogs, each a list of {"role": "system"|"user"|"assistant", "content": str}
        system: a system prompt for the interactive chat
    """
    llm, dialogs = start(options, _read_dialogs, dialogs_file)
    if dialogs is not None:
        for batch in _batches(dialogs, options.max_batch_size):
            for dialog, result in zip(batch, llm.chat_completion(batch, **options.sampling())):
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
            for piece in llm.chat_stream(dialog, **options.sampling()):
                answer.append(piece)
                if is_main_process():
                    print(piece, end="", flush=True)
        except RequestError as exc:  # the conversation outgrew max_seq_len: start afresh, keep the system prompt
            print0(f"\n[{exc}; starting a new conversation]")
            dialog = dialog[:1] if system else []
            continue
        print0()
        dialog.append({"role": "assistant", "content": "".join(answer)})


def quantize(src: str, dst: str, mode: str = "int8", keep_output_precision: bool = False):
    """Write a quantized copy of the float checkpoint SRC to DST: int8 weights with one bfloat16 scale per output
    channel, the same shard count (so it runs on the same world sizes), params.json naming the scheme. Load it
    like any checkpoint (--ckpt_dir DST): no --quantize needed. One process; it holds the int8 checkpoint in memory.

    Args:
        src: a float (bf16/fp16/fp32) Meta checkpoint directory
        dst: the directory to write
        mode: int8 (int4 is quantized at load time: its packed layout depends on the CPU)
        keep_output_precision: keep the output projection as stored
    """
    started = time.perf_counter()
    out = write_quantized(src, dst, make_scheme(mode, keep_output_precision=keep_output_precision))
    size = sum(f.stat().st_size for f in out.glob("consolidated.*.pth"))
    print(f"wrote {out} ({mode}, {size / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")


# Where gloo's transport raises a peer's death or a receive timeout; it gives them no type of their own.
_GLOO_TRANSPORT = "gloo/transport/"


def lost_contact(exc: BaseException) -> bool:
    """A peer died or a collective timed out: torch's distributed error types (NCCL, the c10d store, our
    shared-memory all-reduce), or the RuntimeError gloo's transport raises for it."""
    return isinstance(exc, dist.DistError) or (
        type(exc) is RuntimeError and _GLOO_TRANSPORT in str(exc)
    )


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for an error the user can fix (one line on rank 0), 1 when this rank lost contact
    with another (a peer died, or a collective outlived the timeout: one line on every surviving rank)."""
    try:
        # convert and quantize run in one process and take none of the run options.
        commands = {"generate": generate, "chat": chat, "convert": convert, "quantize": quantize}
        fire.Fire(commands, command=argv, name="llama-dist")
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
