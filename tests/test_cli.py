"""The command line (`python -m llama_dist`, `llama-dist`) on the bundled tiny model.

Flags and output run in-process as one rank; an interactive chat left idle longer than --timeout_s, and a rank
that dies or stalls mid-generation, run as real `torchrun --nproc_per_node 2` jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llama_dist import cli
from llama_dist.formats.checklist import file_md5
from llama_dist.generation import Llama
from llama_dist.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "checkpoints" / "tiny"
PROMPT = "one two three four"
GREEDY = ["--temperature", "0", "--max_gen_len", "6"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", LLAMA_DIST_TIMEOUT="600")
    return env


def _kill(proc: subprocess.Popen) -> None:
    """End a job: SIGTERM lets torchrun stop its ranks (each runs in a session of its own), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---- generate / chat flags, in-process ------------------------------------------------------------------


def test_prompts_file_runs_in_batches(tmp_path, capsys, monkeypatch):
    prompts = ["one two three", "a b c", "five six", "d e f g", "ten eleven"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    batches = []
    original = Llama.text_completion

    def spy(self, batch, *args, **kwargs):
        batches.append(batch)
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(Llama, "text_completion", spy)
    rc, out, err = run_cli(capsys, "generate", "--prompts_file", tmp_path / "prompts.txt", "--max_batch_size", 2,
                           *GREEDY)
    assert rc == 0, err
    assert [len(b) for b in batches] == [2, 2, 1]
    lines = out.splitlines()
    shown = [line[2:] for line in lines if line.startswith("> ")]
    assert shown == prompts
    completions = [lines[lines.index(f"> {p}") + 1] for p in prompts]
    assert all(c.strip() for c in completions), out
    assert "[5 prompt(s)," in out


def _logprobs(out: str) -> list[float]:
    line = next(line for line in out.splitlines() if line.startswith("  logprobs: "))
    return [float(x) for x in re.findall(r":(-?\d+\.\d{3})(?= |$)", line)]


def test_echo_and_logprobs_output(capsys):
    rc, plain, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--logprobs", *GREEDY)
    assert rc == 0, err
    rc, echoed, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--logprobs", "--echo", *GREEDY)
    assert rc == 0, err
    completion = plain.splitlines()[plain.splitlines().index(f"> {PROMPT}") + 1]
    echo_completion = echoed.splitlines()[echoed.splitlines().index(f"> {PROMPT}") + 1]
    assert completion.startswith("five six")
    assert echo_completion == f"{PROMPT} {completion}"
    generated, with_prompt = _logprobs(plain), _logprobs(echoed)
    assert len(generated) == 6  # one per generated token: max_gen_len of them, the tiny model counts on
    prompt_tokens = load_tokenizer(TINY / "tokenizer.model").encode(PROMPT, bos=True, eos=False)
    assert len(with_prompt) == len(prompt_tokens) + len(generated)  # echo adds the prompt's tokens, BOS included
    assert with_prompt[len(prompt_tokens):] == generated and all(lp <= 0 for lp in with_prompt)


def test_chat_dialogs_file(tmp_path, capsys):
    dialogs = [
        [{"role": "user", "content": "count: one two three"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}],
    ]
    (tmp_path / "dialogs.json").write_text(json.dumps(dialogs))
    rc, out, err = run_cli(capsys, "chat", "--dialogs_file", tmp_path / "dialogs.json", "--max_batch_size", 1, *GREEDY)
    assert rc == 0, err
    assert "user> count: one two three" in out and "system> be brief" in out and "user> a b c" in out
    assert len(re.findall(r"^assistant> ", out, re.MULTILINE)) == 2


@pytest.mark.parametrize(
    "flags, message",
    [(["--top_p", 2], "top_p must be in (0, 1]"), (["--timeout_s", 0], "timeout_s must be a positive number")],
)
def test_bad_flag_value_is_one_error_line(capsys, flags, message):
    rc, _, err = run_cli(capsys, "generate", "--prompt", PROMPT, *flags)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"llama-dist: error: {message}"), err


def test_verify_checksums(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    shutil.copytree(TINY, ckpt)
    names = ["consolidated.00.pth", "params.json"]
    (ckpt / "checklist.chk").write_text("".join(f"{file_md5(ckpt / n)}  {n}\n" for n in names))
    rc, out, err = run_cli(capsys, "generate", "--ckpt_dir", ckpt, "--prompt", PROMPT, "--verify_checksums", *GREEDY)
    assert rc == 0, err
    assert "Verified the md5 sums" in out and "five six" in out
    # chat too; a bad md5 is one error line and status 2
    (ckpt / "checklist.chk").write_text("".join(f"{'0' * 32}  {n}\n" for n in names))
    (tmp_path / "d.json").write_text(json.dumps([[{"role": "user", "content": "hi"}]]))
    rc, _, err = run_cli(capsys, "chat", "--ckpt_dir", ckpt, "--dialogs_file", tmp_path / "d.json",
                         "--verify_checksums")
    assert rc == 2 and "has md5" in err and len(err.splitlines()) == 1, err


def test_the_process_group_starts_once_with_the_timeout_flag(capsys, monkeypatch):
    calls = []
    real = cli.init_distributed
    monkeypatch.setattr(cli, "init_distributed", lambda **kw: calls.append(kw) or real(**kw))
    for command in (["generate", "--prompt", PROMPT], ["chat", "--dialogs_file", "missing.json"]):
        calls.clear()
        run_cli(capsys, *command, "--timeout_s", 42, *GREEDY)
        assert calls == [{"timeout_s": 42}]


def test_console_script():
    exe = shutil.which("llama-dist", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("llama-dist is not installed (pip install -e .)")
    result = subprocess.run([exe, "generate", "--prompt", PROMPT, *GREEDY], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert f"> {PROMPT}\nfive six" in result.stdout


# ---- real 2-rank jobs ----------------------------------------------------------------------------------------


def test_interactive_chat_survives_idle_longer_than_the_timeout(tmp_path):
    """Rank 0 waits in input() for 6 s while rank 1 waits for the turn: twice --timeout_s, yet both turns answer."""
    with open(tmp_path / "stderr.txt", "w") as stderr:  # the job keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [*TORCHRUN, "-m", "llama_dist", "chat", "--timeout_s", "3", "--max_gen_len", "8"],
            cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
        )
    chunks: list[bytes] = []

    def read():
        while chunk := os.read(proc.stdout.fileno(), 4096):
            chunks.append(chunk)

    threading.Thread(target=read, daemon=True).start()

    def wait_for_prompts(n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while b"".join(chunks).count(b"user> ") < n:
            if time.monotonic() > deadline or proc.poll() is not None:
                err = (tmp_path / "stderr.txt").read_text()[-3000:]
                pytest.fail(f"no {n} 'user> ' prompts:\n{b''.join(chunks).decode()}\n{err}")
            time.sleep(0.1)

    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        wait_for_prompts(2)  # the first answer is out; rank 0 is back in input()
        time.sleep(6)
        proc.stdin.write(b"one two three\n")
        proc.stdin.flush()
        wait_for_prompts(3)
        proc.stdin.write(b"exit\n")
        proc.stdin.close()
        rc = proc.wait(timeout=30)
    finally:
        _kill(proc)
    out, err = b"".join(chunks).decode(), (tmp_path / "stderr.txt").read_text()
    assert rc == 0, out + err[-3000:]
    assert out.count("assistant> ") == 2, out
    assert "llama-dist: error" not in err


CRASHING_JOB = """
import os, sys, time
os.dup2(os.open(f"{sys.argv[1]}/rank{os.environ['RANK']}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
import llama_dist.cli, llama_dist.model
if os.environ["RANK"] == "1":  # rank 1 breaks after a few forward passes
    forward, calls = llama_dist.model.Transformer.forward, [0]

    def breaking_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 3:
            os._exit(0) if sys.argv[2] == "exit" else time.sleep(1000)
        return forward(self, *args, **kwargs)

    llama_dist.model.Transformer.forward = breaking_forward
sys.exit(llama_dist.cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("mode, reason", [("exit", "(?i)connection|timed out|exited"), ("stall", "(?i)timed out")])
def test_lost_rank_is_one_error_line_per_surviving_rank(tmp_path, mode, reason):
    """Rank 1 exits (status 0, so torchrun waits for rank 0) or stalls mid-generation: rank 0 prints one line."""
    (tmp_path / "job.py").write_text(CRASHING_JOB)
    args = ["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "32", "--timeout_s", "3"]
    start = time.monotonic()
    proc = subprocess.Popen([*TORCHRUN, str(tmp_path / "job.py"), str(tmp_path), mode, *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"{mode}: the job still ran after 90 s")
    seconds = time.monotonic() - start
    rank0 = (tmp_path / "rank0.err").read_text()
    print(f"[{mode}] torchrun exited {proc.returncode} after {seconds:.1f} s; rank 0's stderr:\n{rank0}")
    assert proc.returncode != 0 and seconds < 60, output[-3000:]
    errors = [line for line in rank0.splitlines() if line.startswith("llama-dist: error:")]
    assert len(errors) == 1, rank0
    assert errors[0].startswith("llama-dist: error: rank 0 lost contact with another rank (")
    assert re.search(reason, errors[0]), errors[0]
    assert "Traceback" not in rank0
