"""Which cache rows hold which sequence. Here a block is a whole cache row (block size = max_seq_len): a running
sequence holds one, and its block table is that one row. The paged cache replaces this allocator (fixed blocks of
a few tokens, prefix hashes), not what the model reads: rows and slot mappings."""

from __future__ import annotations

from llama_dist.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_rows: int, max_seq_len: int):
        self.num_rows, self.max_seq_len = num_rows, max_seq_len
        self._free = list(range(num_rows))

    def can_allocate(self, seq: Sequence) -> bool:
        return bool(self._free) and seq.num_prompt_tokens <= self.max_seq_len

    def allocate(self, seq: Sequence) -> None:
        seq.cache_row = self._free.pop(0)

    def free(self, seq: Sequence) -> None:
        if seq.cache_row is not None:
            self._free.append(seq.cache_row)
            self._free.sort()  # lowest rows first: a lone request keeps using row 0
            seq.cache_row = None

    @property
    def usage(self) -> float:
        """The share of cache rows in use."""
        return 1 - len(self._free) / self.num_rows
