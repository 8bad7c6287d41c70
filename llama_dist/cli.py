"""Command line: `python -m llama_dist generate|chat|serve|convert|quantize ...` (also installed as `llama-dist`).

The same command runs as one process, under `torchrun --nproc_per_node N`, or under `srun`: every rank runs
it, rank 0 reads the input and prints, the others compute their slice of the model.
"""

from __future__ import annotations

import difflib
import inspect
import os
import signal
import sys
import time
from pathlib import Path

import fire
import torch.distributed as dist

from llama_dist.checkpoint.convert import convert, quantize
from llama_dist.dist.groups import (
    init_distributed,
    is_main_process,
    long_wait_group,
    lost_contact,
    on_main_then_share,
    print0,
    shutdown_distributed,
)
from llama_dist.dist.launch_env import read_launch_env
from llama_dist.errors import (
    ConfigError,
    DialogError,
    LlamaDistError,
    PromptTooLongError,
    RequestError,
    StartupError,
    one_line,
)
from llama_dist.llm import Llama
from llama_dist.run_options import RunOptions, command
from llama_dist.serve.engine_loop import DEFAULT_MAX_QUEUE, ServingEngine
from llama_dist.text.chat import format_dialog
from llama_dist.text.user_input import read_dialogs, read_prompts, read_user_turn

# Errors a user can fix from the message alone: shown as one line on rank 0 instead of a traceback. Besides
# the project's own, only the file-system errors of paths the user gave.
USER_ERRORS = (LlamaDistError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
REPO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"
INSTALLED_CHECKPOINT = Path(sys.prefix) / "share" / "llama_dist" / "checkpoints" / "tiny"


def check_flags(argv: list[str]) -> None:
    """Refuse a flag the command does not take before anything runs (fire would only complain about leftover
    flags after the command returned: after the whole job ran with defaults), naming the closest valid one."""
    if not argv:
        raise ConfigError(f"give a command: {', '.join(COMMANDS)} (llama-dist COMMAND --help lists its flags)")
    if argv[0] not in COMMANDS:
        if argv[0].startswith("-"):
            return  # fire's own flags (--help)
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f": did you mean {close[0]}?" if close else f"; the commands are {', '.join(COMMANDS)}"
        raise ConfigError(f"no command {argv[0]!r}{hint}")
    known = sorted(inspect.signature(COMMANDS[argv[0]]).parameters)
    for token in argv[1:]:
        if token == "--":
            break  # fire's own flags (--help, --interactive, ...) follow
        if not token.startswith("--") or token == "--help":
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in known or (name.startswith("no") and name[2:] in known):  # fire's --noecho negates --echo
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f": did you mean --{close[0]}?" if close else f" (see llama-dist {argv[0]} --help)"
        raise ConfigError(f"{argv[0]} has no flag --{name}{hint}")


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
        compile=options.compile, kernel_choice=options.kernel_choice,
        max_num_batched_tokens=options.max_num_batched_tokens, block_size=options.block_size,
        kv_cache_tokens=options.kv_cache_tokens, gpu_memory_fraction=options.gpu_memory_fraction,
        prefix_caching=options.prefix_caching, speculative=options.speculative,
        num_speculative_tokens=options.num_speculative_tokens, ngram_max=options.ngram_max,
        ngram_min=options.ngram_min, draft_ckpt_dir=options.draft_ckpt_dir, draft_quantize=options.draft_quantize,
    )
    return llm, user_input


def _check_prompt_lengths(llm: Llama, prompts: list[tuple[str, str]]) -> None:
    """Every prompt fits max_seq_len, checked before the first is generated (and named by its line)."""
    limit = llm.model.max_seq_len
    for where, text in prompts:
        try:
            count = len(llm.tokenizer.encode(text, bos=True, eos=False))
        except LlamaDistError as exc:
            raise RequestError(f"{where}: {exc}") from None
        if count > limit:
            raise RequestError(f"{where}: the prompt has {count} tokens, more than --max_seq_len={limit}")


def _check_dialogs(llm: Llama, dialogs: list, dialogs_file: str) -> None:
    """Every dialog of --dialogs_file formats and fits max_seq_len, checked before the first is answered."""
    limit = llm.model.max_seq_len
    for i, dialog in enumerate(dialogs):
        try:
            count = len(format_dialog(llm.tokenizer, dialog))
        except LlamaDistError as exc:
            raise DialogError(f"{dialogs_file}: dialog {i}: {exc}") from None
        if count >= limit:
            raise DialogError(f"{dialogs_file}: dialog {i} has {count} tokens, more than --max_seq_len={limit} allows")


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
    llm, numbered = start(options, read_prompts, prompt, prompts_file)
    on_main_then_share(_check_prompt_lengths, llm, numbered)
    prompts = [text for _, text in numbered]
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
    compile_s = sum(llm.decode_step.compile_s.values())  # spent once per bucket, inside its first decode step
    compiled = f"; compiling the decode step took {compile_s:.1f} s more" if compile_s else ""
    seconds -= compile_s
    print0(f"[{len(prompts)} prompt(s), {generated} tokens in {seconds:.2f} s, "
           f"{generated / max(seconds, 1e-9):.1f} tok/s{compiled}]")


@command
def chat(dialogs_file: str | None = None, system: str | None = None, *, options: RunOptions):
    """Chat interactively on rank 0 (answers stream; 'exit' or Ctrl-D ends), or answer --dialogs_file.

    --timeout_s bounds the collectives of generation, not the time the user takes to type: an interactive chat
    may sit idle for days.

    Args:
        dialogs_file: JSON list of dialogs, each a list of {"role": "system"|"user"|"assistant", "content": str}
        system: a system prompt for the interactive chat
    """
    llm, dialogs = start(options, read_dialogs, dialogs_file)
    if dialogs is not None:
        on_main_then_share(_check_dialogs, llm, dialogs, dialogs_file)
        for batch in _batches(dialogs, options.max_batch_size):
            for dialog, result in zip(batch, llm.chat_completion(batch, **options.sampling())):
                for message in dialog:
                    print0(f"{message['role']}> {message['content']}")
                print0(f"assistant> {result['generation']['content']}\n")
        return
    dialog = [{"role": "system", "content": system}] if system else []
    print0("Chat with the model; 'exit' or Ctrl-D ends.")
    turn_group = long_wait_group()  # the other ranks wait for the user's turn here, unbounded by timeout_s
    while (line := on_main_then_share(read_user_turn, group=turn_group)) is not None:
        dialog.append({"role": "user", "content": line})
        answer = []
        if is_main_process():
            print("assistant> ", end="", flush=True)
        try:
            for piece in llm.chat_stream(dialog, **options.sampling()):
                answer.append(piece)
                if is_main_process():
                    print(piece, end="", flush=True)
        except PromptTooLongError as exc:  # the conversation outgrew max_seq_len: start afresh, keep the system prompt
            print0(f"\n[{exc}; starting a new conversation]")
            dialog = dialog[:1] if system else []
            continue
        print0()
        dialog.append({"role": "assistant", "content": "".join(answer)})


@command
def serve(host: str = "127.0.0.1", port: int = 8000, max_queue: int = DEFAULT_MAX_QUEUE,
          model_name: str | None = None, api_key: str | None = None, max_request_mb: float = 4.0,
          request_timeout_s: float = 30.0, max_connections: int | None = None, *, options: RunOptions):
    """Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
    /tokenize, /detokenize) from
    rank 0, decoding up to --max_batch_size requests at once (continuous batching); Ctrl-C or SIGTERM to rank 0
    lets running requests finish (a few seconds at most) and stops every rank. Sampling settings come with each
    request; the sampling flags below are not used.

    Args:
        host: the address to listen on (0.0.0.0 for every interface)
        port: the port to listen on (0: any free one, printed at start)
        max_queue: requests that may wait for a free slot; more get HTTP 429
        model_name: the model id clients name (default: the checkpoint directory's name); another name is a 404
        api_key: requests must carry `Authorization: Bearer <api_key>` (401 otherwise; /health and /metrics stay
            open); default: the LLAMA_DIST_API_KEY environment variable, else none
        max_request_mb: larger request bodies get HTTP 413 before they are read whole
        request_timeout_s: a client has this long to send a request's headers, and again its body; then HTTP 408
            and the connection closes (idle connections close after it too)
        max_connections: requests on open connections beyond this many get HTTP 503 (default: the open-file limit,
            raised to its maximum, less a reserve)
    """
    from llama_dist.serve.api import make_app  # the HTTP stack loads only for serving
    from llama_dist.serve.http_server import HttpServer

    if float(request_timeout_s) <= 0 or (max_connections is not None and int(max_connections) < 1):
        raise ConfigError("--request_timeout_s must be above 0 and --max_connections at least 1")  # on every rank
    http = HttpServer(request_timeout_s=float(request_timeout_s),
                      max_connections=None if max_connections is None else int(max_connections)) \
        if is_main_process() else None
    # The port is the input of serve: bound before loading (a taken port fails at once, not after minutes of
    # loading), listened on only once the engine is ready.
    llm, _ = start(options, lambda: http.bind(host, port))
    name = model_name or (Path(options.ckpt_dir) if options.ckpt_dir else default_checkpoint()).resolve().name
    engine = ServingEngine(llm, name, max_queue=max_queue, seed=options.seed)
    llm.engine.warm_up()  # every compiled shape before the port listens: no client waits for a compile
    api_key = api_key if api_key is not None else os.environ.get("LLAMA_DIST_API_KEY") or None
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print0(f"Warning: serving on {host} without --api_key: anyone who can reach this port can use the model")
    on_main_then_share(lambda: http.start(make_app(engine, api_key=None if api_key is None else str(api_key),
                                                   max_request_mb=float(max_request_mb),
                                                   request_timeout_s=float(request_timeout_s))))
    _stop_on_signals(engine)
    url = f"http://{host}:{http.port}/v1" if http else ""
    print0(f"Serving {name} at {url} ({dist.get_world_size()} rank(s), {options.max_batch_size} slots); "
           f"Ctrl-C stops")
    try:
        engine.run()
    finally:
        if http is not None:
            http.stop()
    print0("Server stopped")


def _stop_on_signals(engine: ServingEngine) -> None:
    """Rank 0 turns Ctrl-C / SIGTERM into an orderly shutdown, and a Ctrl-C again a second later into an
    interruption; the other ranks ignore both and stop when rank 0's loop tells them (a terminal's Ctrl-C reaches
    every rank, and torchrun forwards SIGTERM to each)."""
    if not is_main_process():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    first = []

    def stop(signum, frame):
        now = time.monotonic()
        if first and signum == signal.SIGINT and now - first[0] > 1.0:
            raise KeyboardInterrupt
        if not first:
            first.append(now)
            print0(f"[{signal.Signals(signum).name}: finishing the running requests, then stopping]")
        engine.request_shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


# convert and quantize run in one process and take none of the run options.
COMMANDS = {"generate": generate, "chat": chat, "serve": serve, "convert": convert, "quantize": quantize}


def _this_rank() -> int | None:
    """This process's rank, or None when it cannot be told (the launch variables themselves may be the error)."""
    try:
        return dist.get_rank() if dist.is_initialized() else read_launch_env().rank
    except Exception:  # noqa: BLE001 - reporting an error must not raise another
        return None


def _report(message: str, every_rank: bool = False) -> None:
    """`llama-dist: error: message` on stderr, on rank 0 (or every rank); never raises."""
    if every_rank or _this_rank() in (0, None):
        try:
            print(f"llama-dist: {message}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - e.g. stderr closed: the exit status still tells
            pass


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0; 2 for an error the user can fix (one line on rank 0; a start-up error on the rank that saw
    it); 1 when this rank lost contact with another (a peer died, or a collective outlived the timeout: one line
    on every surviving rank); 130 after Ctrl-C (one line on rank 0)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    sigint_handler = None  # set once Ctrl-C was handled: restored on the way out
    try:
        check_flags(argv)
        fire.Fire(COMMANDS, command=argv, name="llama-dist")
        return 0
    except StartupError as exc:  # there is no group yet: each rank says what it saw
        _report(f"error: {one_line(exc)}", every_rank=True)
        return 2
    except USER_ERRORS as exc:
        _report(f"error: {one_line(exc)}")
        return 2
    except KeyboardInterrupt:
        sigint_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown
        _report("interrupted")
        return 130
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        _report(f"error: rank {_this_rank()} lost contact with another rank ({one_line(exc, first=True)})",
                every_rank=True)
        return 1
    finally:
        try:
            shutdown_distributed()
        except BaseException:  # noqa: BLE001 - the outcome is decided; a failing teardown must not replace it
            pass
        if sigint_handler is not None:
            signal.signal(signal.SIGINT, sigint_handler)


if __name__ == "__main__":
    sys.exit(main())
