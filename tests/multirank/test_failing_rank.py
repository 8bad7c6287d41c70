"""A rank that dies or stalls ends the whole job, non-zero, within a bounded time: never an endless hang.

The jobs are real `torchrun --nproc_per_node 2` runs (run_local would stop the other ranks itself and hide
what torch and torchrun do). This file is also their worker script:
`torchrun --standalone --nproc_per_node 2 tests/multirank/test_failing_rank.py MODE CKPT_DIR`.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SPM_VOCAB

REPO = Path(__file__).resolve().parents[2]
GROUP_TIMEOUT_S = 10  # the process-group timeout the jobs run with
BOUND_S = 60  # every job must have ended, non-zero, within this
HARD_LIMIT_S = 150  # past this the test kills the job itself and fails
FORWARDS_BEFORE_EXIT = 5


# ---- the worker: run by torchrun on each rank ----------------------------------------------------------------


def worker(mode: str, ckpt: str) -> None:
    """Build, serve one request, then break rank 1 ("exit0"/"exit1": it exits mid-generation; "stall": it
    sleeps before the next request) and report on rank 0 how the next request ends."""
    from llama_dist.llm import Llama

    rank = int(os.environ["RANK"])
    timeout_s = float(os.environ["TEST_TIMEOUT_S"]) if "TEST_TIMEOUT_S" in os.environ else None
    llm = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=256, max_batch_size=1, dtype="float32",
                      timeout_s=timeout_s)
    llm.generate([[1, 2, 3]], 4, temperature=0)  # both ranks are up and in step
    if rank == 1 and mode.startswith("exit"):
        step, calls = llm.model.forward_step, [0]

        def dying_step(*args, **kwargs):  # every engine step runs through model.forward_step
            calls[0] += 1
            if calls[0] > FORWARDS_BEFORE_EXIT:
                os._exit(int(mode.removeprefix("exit")))  # no cleanup, no goodbye to the other rank
            return step(*args, **kwargs)

        llm.model.forward_step = dying_step
    if rank == 1 and mode == "stall":
        time.sleep(1000)  # alive, but never reaches the next collective
    start = time.monotonic()
    try:
        llm.generate([[1, 2, 3]], 200, temperature=0)
    except Exception as exc:
        print(f"rank {rank} raised {type(exc).__name__} after {time.monotonic() - start:.1f} s: {exc}", flush=True)
        raise
    print(f"rank {rank} finished", flush=True)


# ---- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path) -> str:
    from helpers import tiny_args, write_checkpoint

    path = tmp_path_factory.mktemp("failing_rank")
    write_checkpoint(path, tiny_args(vocab_size=SPM_VOCAB, n_kv_heads=2), seed=3)
    shutil.copy(spm_model_path, path / "tokenizer.model")
    return str(path)


def run_job(mode: str, ckpt: str, **env) -> tuple[int, float, str]:
    """torchrun the worker on 2 ranks; (exit code, seconds until torchrun exited, combined output)."""
    # The worker script imports the tests' helpers module (tests/), as pytest's rank processes do.
    pythonpath = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, mode, ckpt]
    start = time.monotonic()
    # A session of its own, so that a job past the hard limit can be killed with every rank it started.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=HARD_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{mode}: the job still ran after {HARD_LIMIT_S} s:\n{output[-3000:]}")
    seconds = time.monotonic() - start
    print(f"\n[{mode}] torchrun exited with {proc.returncode} after {seconds:.1f} s")
    return proc.returncode, seconds, output


def rank0_report(output: str):
    """(exception type, seconds rank 0 waited, message) from the worker's line, or None if it printed none."""
    match = re.search(r"^rank 0 raised (\w+) after ([\d.]+) s: (.*)$", output, re.MULTILINE)
    return (match.group(1), float(match.group(2)), match.group(3)) if match else None


# gloo raises RuntimeError; the shared-memory all-reduce CPU ranks on one host use raises its subclass.
LOST_PEER_ERRORS = ("RuntimeError", "PeerLostError")


@pytest.mark.parametrize("exit_code", [1, 0])
def test_rank_exiting_mid_generation_ends_the_job(ckpt, exit_code):
    # Exit code 1: torchrun stops the other rank itself. Exit code 0: torchrun waits for rank 0, which must
    # fail on its own (gloo sees the closed connection at once; the group timeout bounds it otherwise).
    rc, seconds, output = run_job(f"exit{exit_code}", ckpt, LLAMA_DIST_TIMEOUT=str(GROUP_TIMEOUT_S))
    report = rank0_report(output)
    print(f"[exit{exit_code}] rank 0: {report}")
    assert rc != 0, output[-3000:]
    assert seconds < BOUND_S, output[-3000:]
    assert "rank 0 finished" not in output
    if exit_code == 0:
        assert report is not None and report[0] in LOST_PEER_ERRORS, output[-3000:]
        assert report[1] < GROUP_TIMEOUT_S, report


def test_stalled_rank_ends_the_job_through_the_group_timeout(ckpt):
    # No process exits: only rank 0's collective timing out can end this job.
    rc, seconds, output = run_job("stall", ckpt, LLAMA_DIST_TIMEOUT=str(GROUP_TIMEOUT_S))
    report = rank0_report(output)
    print(f"[stall] rank 0: {report}")
    assert rc != 0, output[-3000:]
    assert seconds < BOUND_S, output[-3000:]
    assert report is not None, output[-3000:]
    exc_type, waited, message = report
    assert exc_type in LOST_PEER_ERRORS and "Timed out" in message, report
    assert GROUP_TIMEOUT_S * 0.9 <= waited < GROUP_TIMEOUT_S * 3, report


def test_timeout_s_argument_overrides_the_environment(ckpt):
    # LLAMA_DIST_TIMEOUT says 600 s; Llama.build(timeout_s=3) must win.
    rc, seconds, output = run_job("stall", ckpt, LLAMA_DIST_TIMEOUT="600", TEST_TIMEOUT_S="3")
    report = rank0_report(output)
    print(f"[stall, timeout_s=3] rank 0: {report}")
    assert rc != 0 and seconds < BOUND_S, output[-3000:]
    assert report is not None and "Timed out" in report[2], output[-3000:]
    assert 2.7 <= report[1] < 9, report


if __name__ == "__main__":
    worker(*sys.argv[1:])
