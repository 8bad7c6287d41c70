"""`python -m llama_dist.torchrun [torchrun flags] -m llama_dist ...`: torchrun, ending in one line on Ctrl-C.

torchrun starts each rank in a session of its own, so a Ctrl-C in the terminal reaches only the agent; the agent
passes it on to the ranks (rank 0 says "llama-dist: interrupted") and then re-raises it as a SignalException,
whose traceback would bury that line. A rank interrupted on its own (exit status 130) ends torchrun with its
failure report. Through this entry point both end with one line and status 130 (128 + the signal number);
every other outcome is torchrun's own.
"""

from __future__ import annotations

import logging
import signal
import sys

INTERRUPTED = 128 + signal.SIGINT
# torchrun's loggers that narrate passing a Ctrl-C on (the one line printed here says it instead).
_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


class _QuietInterrupt(logging.Filter):
    """Drops torchrun's log lines about a Ctrl-C: the death signal received, SIGINT passed on, a rank's status
    130. Its lines about anything else (a rank that crashed, SIGTERM sent to the survivors) stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in ("death signal", "closing signal SIGINT", "exitcode: 130"))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_QuietInterrupt())
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
        interrupted = sorted(rank for rank, failure in exc.failures.items() if failure.exitcode == INTERRUPTED)
        if not interrupted:
            raise
        print(f"llama-dist: rank {interrupted[0]} was interrupted; torchrun stopped the others", file=sys.stderr,
              flush=True)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
