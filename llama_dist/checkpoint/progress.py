"""Progress of long work (loading, converting, quantizing, writing benchmark checkpoints), shown on rank 0: a bar
on stderr when that is a terminal, else one plain line once done (logs and pipes get no bar characters)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from llama_dist.dist.groups import is_main_process


def human_size(nbytes: float) -> str:
    """Bytes in the unit that fits: "812 B", "3.3 MiB", "2.80 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


class Progress:
    """`advance(amount)` after each piece of work (`total` in all: bytes, or pieces when in_bytes is False);
    `done()` closes the bar, or prints `summary` when there was no bar, formatted with {count} (pieces done),
    {size} (bytes done, in the unit that fits) and {seconds}. Only rank 0 shows anything."""

    def __init__(self, description: str, total: float, summary: str, in_bytes: bool = True, unit: str = " tensors"):
        self.summary, self.count, self.amount = summary, 0, 0
        self.main = is_main_process()
        self.show_bar = self.main and sys.stderr.isatty()
        self.started = time.perf_counter()
        units = dict(unit="B", unit_scale=True, unit_divisor=1024) if in_bytes else dict(unit=unit)
        self.bar = tqdm(total=total, desc=description, disable=not self.show_bar, **units)

    def advance(self, amount: float = 1) -> None:
        self.count += 1
        self.amount += amount
        self.bar.update(amount)

    def done(self) -> None:
        self.bar.close()
        if self.main and not self.show_bar:
            seconds = time.perf_counter() - self.started
            print(self.summary.format(count=self.count, size=human_size(self.amount), seconds=seconds), flush=True)
