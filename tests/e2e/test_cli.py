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
import torch
from helpers import cli_env, run_cli

from llama_dist import cli
from llama_dist.checkpoint.checklist import file_md5
from llama_dist.errors import RequestError
from llama_dist.llm import Llama
from llama_dist.text import user_input
from llama_dist.text.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "checkpoints" / "tiny"
PROMPT = "one two three four"
GREEDY = ["--temperature", "0", "--max_gen_len", "6"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


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
    result = subprocess.run([exe, "generate", "--prompt", PROMPT, *GREEDY], env=cli_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert f"> {PROMPT}\nfive six" in result.stdout


# ---- real 2-rank jobs ----------------------------------------------------------------------------------------


def test_interactive_chat_survives_idle_longer_than_the_timeout(tmp_path):
    """Rank 0 waits in input() for 6 s while rank 1 waits for the turn: twice --timeout_s, yet both turns answer."""
    with open(tmp_path / "stderr.txt", "w") as stderr:  # the job keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [*TORCHRUN, "-m", "llama_dist", "chat", "--timeout_s", "3", "--max_gen_len", "8"],
            cwd=REPO, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
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
import llama_dist.cli, llama_dist.model.llama
if os.environ["RANK"] == "1":  # rank 1 breaks after a few engine steps
    step, calls = llama_dist.model.llama.Transformer.forward_step, [0]

    def breaking_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 3:
            os._exit(0) if sys.argv[2] == "exit" else time.sleep(1000)
        return step(self, *args, **kwargs)

    llama_dist.model.llama.Transformer.forward_step = breaking_step
sys.exit(llama_dist.cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("mode, reason", [("exit", "(?i)connection|timed out|exited"), ("stall", "(?i)timed out")])
def test_lost_rank_is_one_error_line_per_surviving_rank(tmp_path, mode, reason):
    """Rank 1 exits (status 0, so torchrun waits for rank 0) or stalls mid-generation: rank 0 prints one line."""
    (tmp_path / "job.py").write_text(CRASHING_JOB)
    args = ["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "32", "--timeout_s", "3"]
    start = time.monotonic()
    proc = subprocess.Popen([*TORCHRUN, str(tmp_path / "job.py"), str(tmp_path), mode, *args], cwd=REPO, env=cli_env(),
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


# ---- mistakes: refused before any work, as one line ----------------------------------------------------------------


def _one_error(rc, out, err, *parts, status=2):
    assert rc == status, (rc, err)
    assert len(err.splitlines()) == 1 and err.startswith("llama-dist: error: "), err
    for part in parts:
        assert str(part) in err, (part, err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", PROMPT, "--temprature", "0"], "generate has no flag --temprature: did you mean --temperature?"),
        (["generate", "--prompt", PROMPT, "--max-seq-lenght=64"], "has no flag --max_seq_lenght: did you mean --max_seq_len?"),
        (["chat", "--dialog_file", "d.json"], "chat has no flag --dialog_file: did you mean --dialogs_file?"),
        (["generate", "--prompt", PROMPT, "--zzz"], "generate has no flag --zzz (see llama-dist generate --help)"),
    ],
)
def test_unknown_flag_is_refused_before_loading(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli, "init_distributed", lambda **kw: pytest.fail("started although a flag was unknown"))
    rc, out, err = run_cli(capsys, *argv)
    _one_error(rc, out, err, message)
    assert out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", PROMPT, "--seed", "abc"], "--seed must be an integer, got 'abc'"),
        (["generate", "--prompt", PROMPT, "--verify_checksums", "false"], "--verify_checksums must be True or False"),
        (["generate", "--prompt", PROMPT, "--max_seq_len", "1.5"], "--max_seq_len must be an integer"),
        (["generate", "--prompt", PROMPT, "--temperature", "hot"], "--temperature must be a number"),
        (["generate", "--prompt", PROMPT, "--max_gen_len", "0"], "max_gen_len must be an integer >= 1"),
        # Before: chat took any RequestError for "the conversation outgrew max_seq_len" and asked again, forever.
        (["chat", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    ],
)
def test_flag_of_the_wrong_kind_is_refused_before_starting(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli, "init_distributed", lambda **kw: pytest.fail("started although a flag was bad"))
    rc, out, err = run_cli(capsys, *argv)
    _one_error(rc, out, err, message)


def test_known_flags_in_every_spelling_still_run(capsys):
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--max-gen-len=6", "--temperature=0", "--noecho")
    assert rc == 0 and "five six" in out, err


def test_every_prompt_of_a_file_is_checked_before_the_first_is_generated(tmp_path, capsys, monkeypatch):
    lines = ["one two three", "a b c", "five six", "", "d e f g", "ten eleven", "one two " * 40, "a b"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(Llama, "text_completion", lambda *a, **k: pytest.fail("generated before checking line 7"))
    rc, out, err = run_cli(capsys, "generate", "--prompts_file", tmp_path / "prompts.txt", "--max_batch_size", 2,
                           "--max_seq_len", 32, *GREEDY)
    _one_error(rc, out, err, f"{tmp_path / 'prompts.txt'} line 7: the prompt has", "more than --max_seq_len=32")
    assert "> " not in out


@pytest.mark.parametrize("where", ["prompt", "prompts_file", "dialogs_file", "chat_line"])
def test_text_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch, where):
    broken = "caf\udce9 au lait"  # how Python hands over the byte 0xe9 from a Latin-1 terminal or argv
    if where == "prompt":
        rc, out, err = run_cli(capsys, "generate", "--prompt", broken, *GREEDY)
        _one_error(rc, out, err, "not valid UTF-8", "0xe9")
    elif where == "prompts_file":
        (tmp_path / "p.txt").write_bytes(b"one two\ncaf\xe9 au lait\n")
        rc, out, err = run_cli(capsys, "generate", "--prompts_file", tmp_path / "p.txt", *GREEDY)
        _one_error(rc, out, err, "p.txt line 2 is not valid UTF-8")
    elif where == "dialogs_file":
        (tmp_path / "d.json").write_bytes(b'[[{"role": "user", "content": "caf\xe9"}]]')
        rc, out, err = run_cli(capsys, "chat", "--dialogs_file", tmp_path / "d.json", *GREEDY)
        _one_error(rc, out, err, "d.json is not valid UTF-8")
    else:  # an interactive line: said, and asked again; the session goes on
        reader, writer = os.pipe()
        os.write(writer, b"caf\xe9 au lait\none two three\nexit\n")
        os.close(writer)
        monkeypatch.setattr(user_input, "_STDIN", user_input.StdinLines(reader))
        try:
            rc, out, err = run_cli(capsys, "chat", *GREEDY)
        finally:
            os.close(reader)
        assert rc == 0, err
        assert err.startswith("llama-dist: that line is not valid UTF-8 text (") and len(err.splitlines()) == 1, err
        assert out.count("assistant> ") == 1


def test_prompts_file_that_is_a_directory(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "generate", "--prompts_file", tmp_path, *GREEDY)
    _one_error(rc, out, err, f"--prompts_file {tmp_path} is a directory")


def _tiny_copy(tmp_path, **params):
    ckpt = tmp_path / "tiny"
    shutil.copytree(TINY, ckpt)
    if params:
        path = ckpt / "params.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **params}))
    return ckpt


def test_non_finite_logits_are_named(tmp_path, capsys):
    ckpt = _tiny_copy(tmp_path)
    weights = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    weights["norm.weight"][:] = float("nan")
    torch.save(weights, ckpt / "consolidated.00.pth")
    for sampling in (["--temperature", "0"], ["--temperature", "0.8"]):
        rc, out, err = run_cli(capsys, "generate", "--ckpt_dir", ckpt, "--prompt", PROMPT, "--max_gen_len", 4, *sampling)
        _one_error(rc, out, err, "the model produced non-finite logits (NaN or inf)")


def test_extreme_temperatures_sample_without_crashing(capsys):
    rc, greedy, err = run_cli(capsys, "generate", "--prompt", PROMPT, *GREEDY)
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--temperature", "1e-300", "--max_gen_len", 6)
    assert rc == 0, err
    completion = out.splitlines()[out.splitlines().index(f"> {PROMPT}") + 1]
    assert completion == greedy.splitlines()[greedy.splitlines().index(f"> {PROMPT}") + 1]  # so cold it is greedy
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--temperature", "1e300", "--max_gen_len", 6)
    assert rc == 0, err


@pytest.mark.parametrize(
    "flags, params, parts",
    [
        (["--max_seq_len", 10**9], {}, ["of KV cache for max_batch_size=4 x max_seq_len=1000000000", "GiB",
                                         "lower max_seq_len or max_batch_size"]),
        ([], {"dim": 2**20}, ["the weights alone", "params.json", "do not fit", "GiB"]),
    ],
    ids=["kv-cache-from-flags", "weights-from-params-json"],
)
def test_sizes_that_cannot_be_allocated_are_refused_before_allocating(tmp_path, capsys, flags, params, parts):
    ckpt = _tiny_copy(tmp_path, **params)
    rc, out, err = run_cli(capsys, "generate", "--ckpt_dir", ckpt, "--prompt", PROMPT, *flags, *GREEDY)
    _one_error(rc, out, err, "this rank needs", "available", *parts)


@pytest.mark.parametrize(
    "argv, parts, absent",
    [
        (["generate", "--prompt", PROMPT, "--max_batch_size", 0], ["max_batch_size must be a positive integer, got 0"],
         "params.json"),
        (["generate", "--prompt", PROMPT, "--ckpt_dir", "{tmp}/nowhere", "--tokenizer_path", "{tmp}/nowhere.model"],
         ["checkpoint not found", "nowhere"], "tokenizer"),
        (["generate", "--prompt", PROMPT, "--ckpt_dir"], ["--ckpt_dir needs a value"], "Traceback"),
        (["generate", "--prompt"], ["--prompt needs a value"], "Traceback"),
        (["chat", "--dialogs_file", "{tmp}/object.json"], ["object.json holds a JSON dict, not a JSON list of dialogs"],
         "unhashable"),
        (["chat", "--dialogs_file", "{tmp}/empty.json"], ["empty.json holds no dialogs"], "Traceback"),
        (["chat", "--dialogs_file", "{tmp}/flat.json"], ["flat.json: dialog 0 is not a list of messages"], "Traceback"),
        (["generate", "--prompt", PROMPT, "--speculative", "medusa"], ["--speculative must be one of ngram, draft"],
         "Traceback"),
        (["generate", "--prompt", PROMPT, "--draft_quantize", "int4"], ["go with --speculative draft"], "Loaded"),
        (["generate", "--prompt", PROMPT, "--speculative", "draft"], ["--speculative draft needs --draft_ckpt_dir"],
         "Loaded"),
    ],
    ids=["max-batch-size", "missing-ckpt-dir", "ckpt-dir-without-value", "prompt-without-value", "dialogs-object",
         "dialogs-empty", "dialogs-flat", "speculative-method", "draft-without-speculative", "draft-without-model"],
)
def test_messages_point_at_the_mistake(tmp_path, capsys, argv, parts, absent):
    (tmp_path / "object.json").write_text(json.dumps({"role": "user", "content": "hi"}))
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "flat.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    rc, out, err = run_cli(capsys, *[str(a).replace("{tmp}", str(tmp_path)) for a in argv], *GREEDY)
    _one_error(rc, out, err, *parts)
    assert absent not in err


@pytest.mark.parametrize(
    "env, parts",
    [
        ({"RANK": "zero", "WORLD_SIZE": "2"}, ["launch variable RANK must be an integer, got 'zero'"]),
        ({"RANK": "0"}, ["launch variable RANK is set but WORLD_SIZE is not"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["launch variable WORLD_SIZE must be >= 1"]),
    ],
)
def test_malformed_launch_variables_are_one_line(capsys, monkeypatch, env, parts):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, *GREEDY)
    _one_error(rc, out, err, *parts)


def test_busy_rendezvous_port_is_one_line(capsys, monkeypatch):
    import socket

    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
        start = time.monotonic()
        rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--timeout_s", 30, *GREEDY)
    _one_error(rc, out, err, f"rank 0 cannot host the rendezvous at 127.0.0.1:{port}", "already in use")
    assert time.monotonic() - start < 3


def test_ctrl_c_in_process_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Llama, "text_completion", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, *GREEDY)
    assert (rc, err) == (130, "llama-dist: interrupted\n")
    assert signal.getsignal(signal.SIGINT) == handler  # the caller's Ctrl-C handling is given back


def test_error_handler_never_raises_a_second_exception(capsys, monkeypatch):
    class Unprintable(RequestError):
        def __str__(self):
            raise RuntimeError("cannot print me")

    def broken(*args, **kwargs):
        raise Unprintable()

    monkeypatch.setattr(Llama, "text_completion", broken)
    real_shutdown = cli.shutdown_distributed

    def failing_shutdown():
        real_shutdown()
        raise RuntimeError("teardown failed")

    monkeypatch.setattr(cli, "shutdown_distributed", failing_shutdown)
    rc, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, *GREEDY)
    assert (rc, err) == (2, "llama-dist: error: Unprintable\n")


INTERRUPTIBLE_JOB = """
import os, sys
rank = os.environ["RANK"]
open(f"{sys.argv[1]}/rank{rank}.pid", "w").write(str(os.getpid()))
os.dup2(os.open(f"{sys.argv[1]}/rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
import llama_dist.cli
sys.exit(llama_dist.cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", ["agent", "rank0"])
def test_ctrl_c_on_the_agent_or_rank_0_ends_in_one_line_and_status_130(tmp_path, target):
    """An interactive 2-rank chat under `python -m llama_dist.torchrun`, waiting for the user; Ctrl-C reaches the
    agent (a terminal's Ctrl-C: the ranks run in sessions of their own) or rank 0 alone."""
    (tmp_path / "job.py").write_text(INTERRUPTIBLE_JOB)
    launcher = [sys.executable, "-m", "llama_dist.torchrun", "--standalone", "--nproc_per_node", "2"]
    with open(tmp_path / "agent.err", "w") as agent_err:
        proc = subprocess.Popen([*launcher, str(tmp_path / "job.py"), str(tmp_path), "chat"], cwd=REPO, env=cli_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=agent_err, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        seen = b""
        while b"user> " not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "agent.err").read_text()[-3000:]
            seen += os.read(proc.stdout.fileno(), 4096)
        start = time.monotonic()
        os.kill(proc.pid if target == "agent" else int((tmp_path / "rank0.pid").read_text()), signal.SIGINT)
        rc = proc.wait(timeout=60)
        seconds = time.monotonic() - start
    finally:
        _kill(proc)
    stderr = {name: (tmp_path / f"{name}.err").read_text() for name in ("agent", "rank0", "rank1")}
    print(f"[{target}] status {rc} after {seconds:.1f} s; stderr: {stderr}")
    assert rc == 130 and seconds < 30, stderr
    assert "Traceback" not in "".join(stderr.values()), stderr
    assert stderr["agent"].strip().splitlines()[-1].startswith("llama-dist: "), stderr["agent"]
    assert len([line for line in stderr["agent"].splitlines() if not line.startswith(("W", "I"))]) == 1, stderr
    if target == "agent":
        assert stderr["rank0"] == "llama-dist: interrupted\n" and stderr["rank1"] == "", stderr
    else:
        assert stderr["rank0"] == "llama-dist: interrupted\n", stderr


def test_unreachable_rendezvous_is_one_line_within_the_timeout(capfd, monkeypatch):
    """Rank 1 of a job whose rank 0 never started: one line (no C++ retry warnings on fd 2), status 2, ~the timeout."""
    from llama_dist.dist.launch_env import free_port

    port = free_port()
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    start = time.monotonic()
    rc = cli.main(["generate", "--prompt", PROMPT, "--timeout_s", "2", *GREEDY])
    seconds = time.monotonic() - start
    out, err = capfd.readouterr()
    _one_error(rc, out, err, f"rank 1 could not join the rendezvous at 127.0.0.1:{port} within the 2 s timeout",
               "nothing listens there")
    assert seconds < 5, seconds
