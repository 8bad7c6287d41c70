"""`python -m llama_dist.torchrun [torchrun flags] -m llama_dist ...`: torchrun, ending in one line on Ctrl-C or
a user error.

torchrun starts each rank in a session of its own, so a Ctrl-C in the terminal reaches only the agent; the agent
passes it on to the ranks (rank 0 says "llama-dist: interrupted") and then re-raises it as a SignalException,
whose traceback would bury that line. A rank interrupted on its own (exit status 130) ends torchrun with its
failure report. Through this entry point both end with one line and status 130 (128 + the signal number).
A user error (a bad flag, a missing file) ends every rank with status 2 after rank 0 printed its one line
(`llama-dist: error: ...`); torchrun would bury that line under its traceback and failure report (~40 lines):
here the job ends with status 2 and that line alone. A failed rank (a lost one, say) ends the job with status 1
and one line per rank, in place of torchrun's traceback and report: a surviving rank says it lost contact, and
this launcher names each rank that could not speak for itself (killed by a signal).
"""

from __future__ import annotations

import logging
import signal
import sys

INTERRUPTED = 128 + signal.SIGINT
FAILED = 1  # llama_dist.cli's exit status when a rank lost contact with another (it says so), or Python's on a crash
USER_ERROR = 2  # llama_dist.cli's exit status for an error the user can fix, already told on rank 0
# torchrun's loggers that narrate passing a Ctrl-C on (the one line printed here says it instead).
_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


class _QuietAgent(logging.Filter):
    """Drops torchrun's log lines that narrate what the lines printed here say: a Ctrl-C (the death signal
    received, SIGINT passed on, a rank's status 130), a signal passed on to the ranks, a rank's failure (each failed
    rank gets one line of ours, or said it itself). Its lines about anything else stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        quiet = ("death signal", "closing signal", "failed (exitcode:")
        return not any(part in message for part in quiet)


def _user_error(exc) -> bool:
    """The ranks ended on a user error: the first failure exited with USER_ERROR, the rest with it too or stopped
    by torchrun (SIGTERM) before they got there."""
    codes = {failure.exitcode for failure in exc.failures.values()}
    _, first = exc.get_first_failure()
    return first.exitcode == USER_ERROR and codes <= {USER_ERROR, -signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_QuietAgent())
    try:
        torchrun_main(argv)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"llama-dist: torchrun stopped its ranks on {name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # a Ctrl-C before the agent installed its handlers
        print("llama-dist: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except ChildFailedError as exc:
        if _user_error(exc):
            return USER_ERROR
        interrupted = sorted(rank for rank, failure in exc.failures.items() if failure.exitcode == INTERRUPTED)
        if interrupted:
            print(f"llama-dist: rank {interrupted[0]} was interrupted; torchrun stopped the others", file=sys.stderr,
                  flush=True)
            return INTERRUPTED
        for line in _unreported_failures(exc):
            print(f"llama-dist: {line}", file=sys.stderr, flush=True)
        return FAILED
    return 0


def _unreported_failures(exc) -> list[str]:
    """One line for each failed rank that could not say why itself: killed by a signal, or an exit status of
    its own. A rank that exited with FAILED has printed its line (lost contact) or its traceback already."""
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        if failure.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-failure.exitcode}"
        elif failure.exitcode != FAILED:
            how = f"exited with status {failure.exitcode}"
        else:
            continue
        lines.append(f"rank {rank} {how} (pid {failure.pid})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
