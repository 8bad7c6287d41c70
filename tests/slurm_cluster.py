"""A real one-node SLURM cluster, started and stopped by the test harness.

Launch scripts are tested against real `sbatch`/`srun` (not a mock): `SlurmCluster` writes a slurm.conf into a
fresh temp dir, makes sure munged runs, starts slurmctld + slurmd as root, waits for the node to go idle, and
submits batch jobs with `sbatch --wait`. The configuration is the smallest that ran on Debian's Slurm 22.05
(munged run as its own user from /run/munge, proctrack/linuxproc, task/none, select/cons_tres with CR_Core).
Needs root and the Debian `slurm-wlm` + `munge` packages (.ci/install_slurm.sh installs them).

    with SlurmCluster() as cluster:
        rc, out = cluster.submit("job.sh", timeout_s=60)
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llama_dist.dist.launch_env import free_port
from llama_dist.dist.shm_allreduce import process_alive

REPO_ROOT = Path(__file__).resolve().parent.parent

# Daemons and munge tools live in /usr/sbin, which a non-login PATH may lack.
_SBIN_DIRS = ("/usr/sbin", "/sbin")
_CLIENT_BINS = ("sbatch", "srun", "sinfo", "scontrol", "scancel")
_DAEMON_BINS = ("slurmctld", "slurmd", "munged", "munge", "unmunge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"

# Variables a launcher sets for its own job. Inherited from an outer job (pytest run under SLURM or torchrun)
# they would make the test job's ranks read the wrong layout, so they are dropped from what jobs inherit.
# SBATCH_*/SRUN_*/SALLOC_* are option defaults (partition, account, ...) meant for some other cluster.
_OUTER_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_OUTER_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def slurm_unavailable_reason() -> str | None:
    """Why a real SLURM cluster cannot be started here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"SLURM tests need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "SLURM tests need root (slurmd runs jobs as root and munged is started as user munge)"
    missing = [b for b in _CLIENT_BINS + _DAEMON_BINS if _which(b) is None]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}); run .ci/install_slurm.sh"
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} missing (the munge package creates it); run .ci/install_slurm.sh"
    return None


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pids(pids: list[int | None], timeout_s: float = 10.0) -> None:
    """SIGTERM all, wait (bounded), then SIGKILL: a daemon that hangs on shutdown must not hang the test run.

    All at once because each daemon takes 1-2 s to shut down; one after the other adds up.
    """
    pids = [p for p in pids if p is not None and process_alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if process_alive(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _munge_works(timeout_s: float = 5.0) -> bool:
    try:
        cred = subprocess.run([_which("munge") or "munge", "-n"], capture_output=True, timeout=timeout_s)
        if cred.returncode != 0:
            return False
        check = subprocess.run(
            [_which("unmunge") or "unmunge"], input=cred.stdout, capture_output=True, timeout=timeout_s
        )
        return check.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class JobResult:
    """Outcome of one batch job: `returncode` is what `sbatch --wait` returned (the job's exit code),
    `output` the job's stdout+stderr file, `state` SLURM's final JobState (e.g. COMPLETED, FAILED)."""

    returncode: int
    output: str
    job_id: str | None = None
    state: str | None = None

    def __iter__(self):
        # Lets callers write `rc, out = cluster.submit(...)` and still reach job_id/state when they need them.
        return iter((self.returncode, self.output))


class SlurmCluster:
    """One-node slurmctld + slurmd in a temp dir. Use as a context manager, or call start()/stop()."""

    def __init__(self, start_timeout_s: float = 60.0, workdir: str | os.PathLike | None = None):
        self.start_timeout_s = start_timeout_s
        self._workdir_arg = workdir
        self.dir: Path | None = None
        self.hostname = socket.gethostname().split(".")[0]
        self._started_munged = False
        self._jobs = 0
        self.env: dict[str, str] = {}

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def ctld_pid_file(self) -> Path:
        return self.dir / "slurmctld.pid"

    @property
    def slurmd_pid_file(self) -> Path:
        return self.dir / "slurmd.pid"

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        reason = slurm_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if self._workdir_arg is not None:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        for sub in ("state", "spool", "jobs"):
            (self.dir / sub).mkdir(exist_ok=True)
        self._write_conf()
        self.env = self._client_env()
        try:
            self._ensure_munged()
            deadline = time.monotonic() + self.start_timeout_s
            # -c: start from an empty state; -i: ignore state files that cannot be read.
            self._run_daemon([_which("slurmctld"), "-c", "-i"], self.ctld_pid_file, deadline)
            self._run_daemon([_which("slurmd")], self.slurmd_pid_file, deadline)
            self._wait_node_idle(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what start() started. Safe to call twice, and after a failed start."""
        if self.dir is None:
            return
        if self._jobs:
            # Cancel leftover jobs first so slurmd does not leave job steps (and their ranks) running.
            # Only after submissions: against a controller that never came up scancel just waits out its timeout.
            self._client(["scancel", "--user", "root"], timeout_s=5, check=False)
        pids = [_read_pid(self.slurmd_pid_file), _read_pid(self.ctld_pid_file)]
        if self._started_munged:
            # Only a munged we started: one that ran before belongs to someone else.
            pids.append(_read_pid(MUNGE_PID_FILE))
            self._started_munged = False
        _stop_pids(pids)
        if self._workdir_arg is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self._jobs = 0

    # ---- job submission ------------------------------------------------------------------------------------
    def submit(
        self,
        script_path: str | os.PathLike,
        args: tuple | list = (),
        env: dict[str, str] | None = None,
        timeout_s: float = 120.0,
        sbatch_args: tuple | list = (),
    ) -> JobResult:
        """Run `sbatch --wait` on script_path and return the job's exit code and output (stdout+stderr).

        The job runs in the repo root and inherits this process's environment (--export=ALL) with PYTHONPATH
        and PATH set so `python` is this interpreter and `import llama_dist` finds the repo; `env` adds or
        overrides variables. On timeout the job is cancelled and TimeoutError raised.
        """
        assert self.dir is not None, "cluster not started"
        self._jobs += 1
        out_file = self.dir / "jobs" / f"job-{self._jobs}.out"
        # A unique name lets us cancel the job on timeout without having read its id from sbatch yet.
        job_name = f"test-{os.getpid()}-{self._jobs}"
        job_env = dict(self.env)
        if env:
            job_env.update(env)
        cmd = [
            _which("sbatch"),
            "--wait",
            "--parsable",
            f"--job-name={job_name}",
            f"--output={out_file}",
            f"--chdir={REPO_ROOT}",
            "--export=ALL",
            *map(str, sbatch_args),
            str(script_path),
            *map(str, args),
        ]
        try:
            proc = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._client(["scancel", f"--name={job_name}"], timeout_s=10, check=False)
            raise TimeoutError(
                f"job {job_name} did not finish in {timeout_s} s; output so far:\n{_read_text(out_file)}"
            ) from None
        job_id = proc.stdout.strip().split(";")[0] or None
        if job_id is None:
            # sbatch printed no id: the job was never submitted (bad option, controller down, ...).
            raise RuntimeError(f"sbatch failed (rc {proc.returncode}):\n{proc.stderr}")
        return JobResult(proc.returncode, _read_text(out_file), job_id, self.job_state(job_id))

    def start_job(
        self,
        script_path: str | os.PathLike,
        args: tuple | list = (),
        env: dict[str, str] | None = None,
        sbatch_args: tuple | list = (),
    ) -> tuple[str, Path]:
        """Submit without waiting (for a job that runs until cancelled, such as a server): (job id, output file).
        Same environment as `submit`; end it with `cancel`."""
        assert self.dir is not None, "cluster not started"
        self._jobs += 1
        out_file = self.dir / "jobs" / f"job-{self._jobs}.out"
        job_env = {**self.env, **(env or {})}
        cmd = [_which("sbatch"), "--parsable", f"--job-name=test-{os.getpid()}-{self._jobs}", f"--output={out_file}",
               f"--chdir={REPO_ROOT}", "--export=ALL", *map(str, sbatch_args), str(script_path), *map(str, args)]
        proc = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=30)
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id:
            raise RuntimeError(f"sbatch failed (rc {proc.returncode}):\n{proc.stderr}")
        return job_id, out_file

    def cancel(self, job_id: str) -> None:
        """scancel: SLURM signals the job's steps (SIGTERM, then SIGKILL after KillWait)."""
        self._client(["scancel", job_id], timeout_s=10)

    def job_state(self, job_id: str) -> str | None:
        """Final JobState from the controller (it keeps finished jobs for MinJobAge seconds)."""
        res = self._client(["scontrol", "-o", "show", "job", job_id], timeout_s=10, check=False)
        for field in res.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    # ---- internals -----------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        mem_mb = _available_mem_mb()
        cpus = os.cpu_count() or 1
        # Free ports instead of the defaults 6817/6818, so a system SLURM or a second test run does not clash.
        ctld_port = free_port()
        while (slurmd_port := free_port()) == ctld_port:
            pass
        # llama_dist derives MASTER_PORT from the job id (20000 + id % 10000). A fresh state would restart ids
        # at 1 every run, so back-to-back runs (or two runs side by side) would reuse the same rendezvous port;
        # a random first id spreads them out.
        first_job_id = random.randint(1000, 900000)
        conf = f"""\
# Written by tests/slurm_cluster.py for one test session; everything lives under {d}.
ClusterName=llamadisttest
# Loopback addresses: one node talks only to itself, and the daemons then do not depend on DNS.
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
# No cgroups: linuxproc tracking and no task plugin work in containers/sandboxes without a cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Let the node come back by itself if it registered while something was off.
ReturnToService=2
FirstJobId={first_job_id}
# `sbatch --wait` sleeps 2 s, then multiplies its sleep by 4 (2, 8, 32 s) while the sleep is below MinJobAge/2:
# with the default 300 it checks at 2, 10, 42 s, so a job that takes 11 s is noticed after 42 s. 5 keeps the
# poll at 2 s, and finished jobs are still kept (>= 5 s) long enough for sbatch and job_state to read them.
MinJobAge=5
# Batch jobs are otherwise scheduled up to 3 s after submission (batch_sched_delay), on an idle test node too.
SchedulerParameters=batch_sched_delay=0
# No mail on this test node; the default /bin/mail is usually absent and slurmctld logs an error for it.
MailProg=/bin/true
# Short kill grace so cancelled/timed-out test jobs go away quickly.
KillWait=5
InactiveLimit=0
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={self.ctld_pid_file}
SlurmdPidFile={self.slurmd_pid_file}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _client_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_OUTER_SLURM_PREFIXES) and k not in _OUTER_JOB_VARS
        }
        # Daemons, clients and (through --export=ALL) srun inside jobs all find the temp config this way.
        env["SLURM_CONF"] = str(self.conf_path)
        # The job's `python` must be this interpreter (same torch/fairscale), and the repo importable.
        path_dirs = [os.path.dirname(sys.executable), *_SBIN_DIRS]
        env["PATH"] = os.pathsep.join([*path_dirs, env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _client(self, argv: list[str], timeout_s: float, check: bool = True) -> subprocess.CompletedProcess:
        argv = [_which(argv[0]) or argv[0], *argv[1:]]
        try:
            res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            if check:
                raise
            return subprocess.CompletedProcess(argv, 124, e.stdout or "", e.stderr or "")
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (rc {res.returncode}):\n{res.stderr}")
        return res

    def _ensure_munged(self) -> None:
        if _munge_works():
            return
        MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        # munged refuses to run as root; the Debian key is readable by user munge only.
        # Output to a file, not a pipe, for the same reason as in _run_daemon.
        with open(self.dir / "munged.stderr", "w+") as err:
            rc = subprocess.run(
                ["su", "-s", "/bin/sh", "munge", "-c", _which("munged")],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=15,
            ).returncode
            err.seek(0)
            if rc != 0:
                raise RuntimeError(f"could not start munged (rc {rc}):\n{err.read()}")
        self._started_munged = True
        deadline = time.monotonic() + 10
        while not _munge_works():
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but `munge -n | unmunge` still fails after 10 s")
            time.sleep(0.1)

    def _run_daemon(self, argv: list[str], pid_file: Path, deadline: float) -> None:
        # Both daemons fork into the background and write their pid file; the foreground process exits.
        # Their stdio goes to a file, not a pipe: a pipe inherited by the background daemon would keep
        # subprocess.run waiting for EOF.
        name = Path(argv[0]).name
        log = self.dir / f"{name}.log"
        with open(self.dir / f"{name}.stderr", "w+") as err:
            rc = subprocess.run(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                timeout=max(1.0, deadline - time.monotonic()),
            ).returncode
            err.seek(0)
            if rc != 0:
                raise RuntimeError(f"{argv[0]} exited with {rc}:\n{err.read()}\nlog:\n{_tail(log)}")
        while (pid := _read_pid(pid_file)) is None or not process_alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not come up (no live pid in {pid_file}); log:\n{_tail(log)}")
            time.sleep(0.1)

    def _wait_node_idle(self, deadline: float) -> None:
        # "idle" exactly: "idle*" (not responding), "down*", "unk*" or "drain" mean slurmd has not registered.
        while True:
            res = self._client(["sinfo", "-h", "-N", "-n", self.hostname, "-o", "%t"], timeout_s=10, check=False)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"{name}:\n{_tail(self.dir / name)}" for name in ("slurmctld.log", "slurmd.log"))
                raise RuntimeError(
                    f"node {self.hostname} not idle after {self.start_timeout_s} s "
                    f"(sinfo: {state!r} {res.stderr.strip()})\n{logs}"
                )
            time.sleep(0.2)


def _available_mem_mb() -> int:
    """A bit less than the free memory: slurmd drains a node whose configured RealMemory exceeds what it has."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(1, int(line.split()[1]) // 1024 * 9 // 10)
    except OSError:
        pass
    return 1024


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
