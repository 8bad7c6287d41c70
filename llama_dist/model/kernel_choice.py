"""Measured kernel choice: at model build, time the candidate kernels of every distinct weight this rank multiplies
by (per activation row bucket) and keep the fastest, instead of `kernels.static_kernel`'s fixed rules.

    choose_kernels(model, "measure")   # every rank of the model-parallel group, after the model is loaded

Every rank times at once (on one host they share the memory bandwidth that decides the winner), the same
candidates in the same order; rank 0's choices are broadcast over the model-parallel group, so the ranks agree.
The timing stops at a time budget (default 2 s): the vocabulary-sized output weight comes first in each bucket,
the one-row (decode) buckets first; what is left runs by the static rule, and is measured at the next start.
Rank 0 keeps the table in `${LLAMA_DIST_CACHE:-~/.cache/llama_dist}/kernels-<hash>.json`, keyed by the CPU model,
the torch version, the thread count and the number of ranks (the hash) and by weight shape, dtype and row bucket
(the entries): the next start reads it instead of timing. Only CPU models are measured; CUDA keeps its rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama_dist.config import cache_dir
from llama_dist.dist.groups import (
    broadcast_object,
    model_parallel_group,
    model_parallel_rank,
    model_parallel_world_size,
    print0,
)
from llama_dist.errors import ConfigError
from llama_dist.model import native
from llama_dist.model.kernels import (
    KERNELS,
    ROW_BUCKETS,
    candidates,
    install_kernel_table,
    run_kernel,
    static_kernel,
    usable,
    weight_key,
)

MODES = ("static", "measure")
MODE_ENV = "LLAMA_DIST_KERNEL_CHOICE"
DEFAULT_BUDGET_S = 2.0
_CACHE_VERSION = 2  # 2: the compiled int8 kernel joined the candidates
_REPEATS = 3  # timed passes per candidate, best kept
_INSTANCES = 8  # weights of one shape cycled through per pass (the layers': each call streams its weight anew)
_HOPELESS = 3.0  # a candidate whose first timed call is this many times the best so far is not timed further
_MARGIN = 0.03  # another kernel replaces the static rule's only when faster by more than this fraction
_now = time.perf_counter  # the budget's clock (a test's seam)


def resolve_mode(mode: str | None) -> str:
    """`mode` checked, or for None $LLAMA_DIST_KERNEL_CHOICE, else "measure"."""
    if mode is None:
        mode = os.environ.get(MODE_ENV, "").strip() or "measure"
    if mode not in MODES:
        raise ConfigError(f"kernel_choice must be static or measure, got {mode!r}")
    return mode


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    return native.cpu_info().get("model name") or platform.processor() or platform.machine()


def machine_identity() -> dict:
    """What a timing depends on besides the weight: the cache file's key."""
    return {"version": _CACHE_VERSION, "cpu": cpu_model(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "ranks": model_parallel_world_size()}


def cache_path(identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{digest}.json"


# ---- what this rank multiplies by ---------------------------------------------------------------------------------


def timing_items(model) -> list[tuple[tuple, int, list]]:
    """[(table key, rows timed, weights of that shape)] for every distinct weight of `model` (matmul_weights) and
    every row bucket a forward can reach, in timing order: the decode buckets first; in each bucket the output
    weight, then the larger weights. The output only sees up to max_batch_size rows (generation projects the last
    position of each sequence); the other weights up to max_batch_size x max_seq_len (prefill)."""
    dtype = model.tok_embeddings.weight.dtype
    shapes: dict[tuple, list] = {}
    limit: dict[tuple, int] = {}
    for owner, attribute, _ in model.matmul_weights():
        weight = getattr(owner, attribute)
        key = weight_key(weight, dtype)
        is_output = owner is model.output
        shapes.setdefault(key, []).append(weight)
        rows = model.max_batch_size if is_output else model.max_batch_size * model.max_seq_len
        limit[key] = max(limit.get(key, 0), rows)
    output_key = weight_key(model.output.weight, dtype)
    ordered = sorted(shapes, key=lambda k: (k != output_key, -k[1] * k[2]))
    items = []
    for bucket, (first, timed) in enumerate(ROW_BUCKETS):
        for key in ordered:
            if first <= limit[key] and len(candidates(key[0], dtype, min(timed, limit[key]))) > 1:
                items.append(((*key, bucket), min(timed, limit[key]), shapes[key][:_INSTANCES]))
    return items


# ---- timing -------------------------------------------------------------------------------------------------------


def _one_pass(name: str, weights: list, x: torch.Tensor) -> float:
    """Seconds per call of kernel `name`, one call on each of `weights` in turn."""
    start = time.perf_counter()
    for weight in weights:
        run_kernel(name, x, weight)
    return (time.perf_counter() - start) / len(weights)


def time_candidates(key: tuple, rows: int, weights: list) -> dict[str, float]:
    """Seconds per call of each candidate kernel for `rows` rows on the weights of table key `key`: the best of
    several passes, the candidates taking turns pass by pass (a drift of the machine's speed then weighs on all
    of them alike, not on whichever ran first). A candidate far behind after the first pass is not timed again."""
    kind, dtype = key[0], key[3]
    x = torch.randn(rows, weights[0].shape[1] if kind == "dense" else weights[0].in_features,
                    generator=torch.Generator().manual_seed(0)).to(dtype)
    names = candidates(kind, dtype, rows)
    static = static_kernel(weights[0], torch.device("cpu"), dtype, rows)
    names.sort(key=lambda n: n != static)
    times: dict[str, float] = {}
    with torch.inference_mode():
        for name in names:
            run_kernel(name, x, weights[0])  # warm-up: oneDNN builds its primitive for a new shape on the first call
            times[name] = _one_pass(name, weights[-1:], x)
        best_first = min(times.values())
        alive = [n for n in names if times[n] <= _HOPELESS * best_first]
        # Enough passes to see past noise, but a heavy call (prefill rows, a vocabulary-sized weight) once only.
        passes = _REPEATS if best_first * len(weights) < 0.1 else 1
        for _ in range(passes):
            for name in alive:
                times[name] = min(times[name], _one_pass(name, weights, x))
    return times


def fastest(times: dict[str, float], static: str) -> str:
    """The fastest kernel, or the static rule's unless another beats it by more than _MARGIN."""
    name = min(times, key=times.get)
    if static in times and times[name] > times[static] * (1 - _MARGIN):
        return static
    return name


# ---- the cache ----------------------------------------------------------------------------------------------------


def _encode(table: dict[tuple, str]) -> list:
    return [[*(str(p).removeprefix("torch.") if isinstance(p, torch.dtype) else p for p in key), name]
            for key, name in table.items()]


def _decode(entries: list) -> dict[tuple, str]:
    table = {}
    for entry in entries:
        *key, name = entry
        kind, dtype = key[0], getattr(torch, key[3])
        if kind not in KERNELS or name not in KERNELS[kind] or not isinstance(dtype, torch.dtype):
            raise ValueError(f"bad entry {entry!r}")
        table[(kind, int(key[1]), int(key[2]), dtype, *(int(k) for k in key[4:]))] = name
    return table


def read_cache(path: Path, identity: dict) -> dict[tuple, str]:
    """The table stored at `path` for `identity`; {} when there is none, or it is unreadable or not this key's."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("identity") != identity:
            return {}
        return _decode(stored["kernels"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return {}


def write_cache(path: Path, identity: dict, table: dict[tuple, str]) -> None:
    """Store `table` at `path` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"identity": identity, "kernels": _encode(table)}, indent=1)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---- the choice ---------------------------------------------------------------------------------------------------


def _from_rank0(obj):
    """Rank 0's `obj` on every rank of the model-parallel group."""
    if model_parallel_world_size() == 1:
        return obj
    group = model_parallel_group()
    return broadcast_object(obj, src=dist.get_global_rank(group, 0), group=group)


def choose_kernels(model, mode: str | None = None, budget_s: float = DEFAULT_BUDGET_S) -> dict[tuple, str]:
    """Choose the kernels `model`'s forward runs, install the table for `kernels.local_linear` and return it.

    mode: "static" (the fixed rules: an empty table), "measure", or None ($LLAMA_DIST_KERNEL_CHOICE, else
    measure). Measuring is collective: every rank of the model-parallel group calls it with the same model.
    Prints one line on rank 0 when it measured or read the cache.
    """
    mode = resolve_mode(mode)
    if mode == "static" or model.tok_embeddings.weight.device.type != "cpu":
        install_kernel_table({})
        return {}
    items = timing_items(model)  # lists the candidates: builds a compiled one first if need be (not timed)
    started = _now()
    wanted = {key for key, _, _ in items}
    main = model_parallel_rank() == 0
    identity = machine_identity()
    path = cache_path(identity)
    cached = read_cache(path, identity) if main else {}
    # The file keeps every model's entries; this model's are kept where their kernel can run here (a compiled
    # one that cannot be built now is measured again).
    usable_cached = {key: name for key, name in cached.items() if key in wanted and usable(key[0], name)}
    # Rank 0 says what to time: the same items, in the same order, on every rank.
    pending = _from_rank0([key for key, _, _ in items if key not in usable_cached] if main else None)
    by_key = {key: (rows, weights) for key, rows, weights in items}
    statics = {key: static_kernel(weights[0], torch.device("cpu"), key[3], rows) for key, rows, weights in items}
    measured: dict[tuple, str] = {}
    for key in pending:
        if not _from_rank0(_now() - started < budget_s if main else None):
            break
        if key in by_key:  # always, as the ranks' slices have the same shapes
            times = time_candidates(key, *by_key[key])
            measured[key] = fastest(times, statics[key])
    seconds = _now() - started
    table = _from_rank0({**usable_cached, **measured} if main else None)
    install_kernel_table(table)
    if main:
        _report(table, measured, pending, cached, statics, path, identity, seconds)
    return table


def _report(table, measured, pending, cached, statics, path, identity, seconds) -> None:
    note = ""
    if measured:
        try:
            write_cache(path, identity, {**cached, **measured})
            note = f", cached in {path}"
        except OSError as exc:
            note = f", not cached ({exc})"
    shapes = len({key[:-1] for key in statics})
    if not statics:
        print0("Kernels: the static rule (no weight here has more than one kernel to choose from)")
        return
    differ = sum(name != statics[key] for key, name in table.items())
    if pending:
        left = len(pending) - len(measured)
        rest = f"; {left} left to the static rule (time budget), measured at the next start" if left else ""
        print0(f"Kernels: measured {len(measured)} (weight shape, row bucket) pairs of {shapes} weight shapes in "
               f"{seconds:.1f} s{note}; {differ} differ from the static rule{rest}")
    else:
        print0(f"Kernels: {len(table)} choices for {shapes} weight shapes read from {path}; "
               f"{differ} differ from the static rule")
