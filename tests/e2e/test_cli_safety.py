"""Command-line hardening: nothing destroyed by mistake (convert/quantize destinations), one line per user error
(also through the project's torchrun launcher), a taken port refused before loading, suggestions for a misspelled
command, progress bars on a terminal and plain lines in a log, sizes in the unit that fits."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import cli_env, run_cli

from llama_dist.text import user_input

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "checkpoints" / "tiny"


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "float"
    shutil.copytree(TINY, path)
    return path


# ---- nothing destroyed by mistake ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["quantize"], ["convert", "--to", "hf"]])
def test_the_source_is_never_the_destination(src, capsys, command):
    before = _fingerprint(src)
    for dst in (src, src / "inside", src.parent):
        argv = [command[0], src, dst, *command[1:]]
        for overwrite in ([], ["--overwrite"]):
            rc, _, err = run_cli(capsys, *argv, *overwrite)
            assert rc == 2 and "write the new one elsewhere" in err and err.count("\n") == 1, err
    assert _fingerprint(src) == before and not (src / "inside").exists()


@pytest.mark.parametrize("command", [["quantize"], ["convert", "--to", "meta"]])
def test_a_non_empty_destination_is_kept_unless_overwrite(src, tmp_path, capsys, command):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, command[0], src, dst, *command[1:])
    assert rc == 2 and "is not an empty directory" in err and "--overwrite" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    before = _fingerprint(src)
    rc, out, _ = run_cli(capsys, command[0], src, dst, *command[1:], "--overwrite")
    assert rc == 0, out
    assert not (dst / "keep.txt").exists() and (dst / "params.json").is_file()
    assert _fingerprint(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "mine"]  # no partial or retired directory left


def test_an_interrupted_write_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    from llama_dist.checkpoint import convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "write_consolidated", interrupted)
    rc, _, err = run_cli(capsys, "quantize", src, tmp_path / "int8")
    assert rc == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


def test_quantize_a_hugging_face_directory(src, tmp_path, capsys):
    """quantize takes a Hugging Face directory too: the int8 checkpoint (Meta's layout) it writes generates what
    the one quantized from the same weights in Meta's layout does; the size line uses the unit that fits."""
    assert run_cli(capsys, "convert", src, tmp_path / "hf", "--to", "hf")[0] == 0
    answers = []
    for source, dst in ((src, tmp_path / "int8_meta"), (tmp_path / "hf", tmp_path / "int8_hf")):
        rc, out, err = run_cli(capsys, "quantize", source, dst)
        assert rc == 0, err
        assert re.search(r"wrote \S+ \(int8, \d+\.\d (KiB|MiB)\)", out), out
        rc, out, err = run_cli(capsys, "generate", "--ckpt_dir", dst, "--prompt", "one two three", "--temperature", 0,
                               "--max_gen_len", 6)
        assert rc == 0, err
        assert re.search(r"Read \d+ tensors \([\d.]+ (KiB|MiB) on rank 0\)", out), out
        answers.append(out.split("> one two three\n")[1].splitlines()[0])
    assert answers[0] == answers[1] == "four five six seven eight nine"


# ---- one line per user error ---------------------------------------------------------------------------------------


def test_a_user_error_through_the_launcher_is_one_line_and_status_2():
    cmd = [sys.executable, "-m", "llama_dist.torchrun", "--standalone", "--nproc_per_node", "2",
           "-m", "llama_dist", "generate", "--ckpt_dir", "/missing/checkpoint", "--prompt", "hi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, lines
    assert lines[0] == "llama-dist: error: checkpoint not found: /missing/checkpoint"
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, lines


@pytest.mark.parametrize("argv, expected", [
    (["generte", "--prompt", "hi"], "llama-dist: error: no command 'generte': did you mean generate?"),
    (["quantise"], "llama-dist: error: no command 'quantise': did you mean quantize?"),
    ([], "llama-dist: error: give a command: generate, chat, serve, convert, quantize"),
])
def test_a_misspelled_or_missing_command(capsys, argv, expected):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.startswith(expected), err


def test_serve_on_a_taken_port_fails_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "llama_dist", "serve", "--port", str(port)], capture_output=True,
                              text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"llama-dist: error: cannot listen on 127.0.0.1:{port}"), proc.stderr
    assert "Read " not in proc.stdout and "Loaded" not in proc.stdout, proc.stdout  # refused before loading
    print(f"refused after {time.monotonic() - started:.1f} s")


def test_load_model_without_a_process_group_says_what_to_call():
    code = "from llama_dist import load_model\nload_model('checkpoints/tiny')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert "ConfigError: load_model needs a process group: call llama_dist.init_distributed() first" in proc.stderr


def test_a_dialog_error_names_the_file_and_the_dialog(tmp_path, capsys):
    dialogs = [[{"role": "user", "content": "hi"}], [{"role": "bot", "content": "hi"}]]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dialogs))
    rc, out, err = run_cli(capsys, "chat", "--dialogs_file", path, "--temperature", 0, "--max_gen_len", 2)
    assert rc == 2 and err.startswith(f"llama-dist: error: {path}: dialog 1: message 0 has role 'bot'"), err
    assert "assistant>" not in out  # checked before the first dialog is answered


def test_ctrl_d_in_chat_ends_the_prompt_line(capsys, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(write_end)  # the user pressed Ctrl-D
    monkeypatch.setattr(user_input, "_STDIN", user_input.StdinLines(read_end))
    assert user_input.read_user_turn() is None
    assert capsys.readouterr().out == "user> \n"
    os.close(read_end)


# ---- progress on long work -----------------------------------------------------------------------------------------


def _run_on_a_terminal(argv: list[str]) -> str:
    """What `argv` writes to a pseudo-terminal (stdout and stderr both)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the command, on a terminal of a real size (a new one has none)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, *argv], cli_env())
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("command", [["convert", "--to", "hf"], ["quantize"]])
def test_progress_bars_on_a_terminal_plain_lines_in_a_log(src, tmp_path, command):
    terminal = _run_on_a_terminal(["-m", "llama_dist", command[0], str(src), str(tmp_path / "tty"), *command[1:]])
    assert "100%|" in terminal, terminal
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "llama_dist", command[0], str(src), str(tmp_path / "logged"),
                        *command[1:]], stdout=out, stderr=subprocess.STDOUT, env=cli_env(), check=True)
    text = log.read_text()
    assert "%|" not in text and "\r" not in text, text
    assert re.search(r"^Read 39 tensors in [\d.]+ s$", text, re.MULTILINE), text


def test_compile_time_is_reported_apart_from_decode_speed():
    proc = subprocess.run([sys.executable, "-m", "llama_dist", "generate", "--prompt", "one two", "--temperature", "0",
                           "--max_gen_len", "4", "--compile"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"\[1 prompt\(s\), 4 tokens in ([\d.]+) s, [\d.]+ tok/s; compiling the decode step took "
                         r"([\d.]+) s more\]", summary)
    assert match, summary
    assert float(match.group(1)) < float(match.group(2))  # the compile time is not in the decode time
