"""The KV cache's blocks: which sequence holds which, shared prompt prefixes, and what to evict.

Each rank's cache is a pool of fixed blocks of `block_size` positions; rank 0 allocates and the step plan carries
the block tables, so every rank's pool holds the same thing. Block 0 is never handed out: padded rows of a
compiled step write there.

Prefix caching: a full block is keyed by a hash of its parent block's key and its own tokens. A new prompt reuses
the longest chain of cached blocks that matches it, token for token (the key is a fast way to find a candidate,
never proof: a hit compares the tokens and the parent's key too), and computes only the rest; its last token is
always computed (its logits are needed). Blocks are shared by reference count and never written by a second
sequence: only full blocks are shared, and a sequence writes only past what it reused. A block whose count drops to
zero stays findable until its memory is needed again (least recently freed first).

Runs (`seek_runs`, the CPU engine's choice): attention on a CPU reads a run of consecutive blocks as one slice,
where scattered blocks cost a gather of the whole context every step. So a new sequence takes its blocks from a
run of free ones long enough for its prompt and its max_tokens, and the rest of that run is reserved for it to
grow into. A reservation is only a preference: the blocks stay free, other sequences take them when nothing else
is free, so it never refuses or delays a request.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from llama_dist.engine.sequence import Sequence

RESERVED_BLOCKS = 1  # block 0: the scratch block of padded rows


def sha256_key(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """A collision-resistant key of a full block: a wrong hit would silently give another prompt's output."""
    digest = hashlib.sha256(parent)
    digest.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return digest.digest()


@dataclass
class _Block:
    id: int
    ref_count: int = 0
    key: bytes | None = None  # set once full and published for reuse
    parent: bytes = b""
    tokens: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 key_fn: Callable[[bytes, tuple[int, ...]], bytes] = sha256_key, seek_runs: bool = False):
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"the KV cache needs more than {RESERVED_BLOCKS} block(s), got {num_blocks}")
        self.block_size, self.prefix_caching, self.key_fn = block_size, prefix_caching, key_fn
        self.seek_runs = seek_runs
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first: a new block is taken from the front (evicting its cached key).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (i, None) for i in range(RESERVED_BLOCKS, num_blocks))
        self._cached: dict[bytes, int] = {}  # key -> block holding those tokens
        self.queries = self.hits = 0  # prompt tokens looked up in / found in the prefix cache
        self._reserved: dict[int, int] = {}  # free block -> id() of the sequence meant to grow into it
        self._reservations: dict[int, list[int]] = {}  # id(sequence) -> its reserved blocks, the next one last

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - RESERVED_BLOCKS

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """The share of usable blocks held by sequences."""
        return 1 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission ------------------------------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks matching the start of `seq`'s tokens, leaving its last token to compute."""
        if not self.prefix_caching or seq.params.prompt_logprobs:  # prompt scores need every position computed
            return []
        tokens, found, parent = seq.token_ids(0, seq.num_tokens), [], b""
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            block_id = self._cached.get(self.key_fn(parent, chunk))
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.tokens != chunk or block.parent != parent:  # the same key, other tokens: not a hit
                break
            found.append(block_id)
            parent = block.key
        return found

    def can_allocate(self, seq: Sequence) -> bool:
        cached = self._cached_prefix(seq)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # free now, taken back by a hit
        needed = self.blocks_for(seq.num_tokens) - len(cached)
        return needed <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing its cached prefix: seq.num_computed_tokens skips it."""
        cached = self._cached_prefix(seq)
        for block_id in cached:
            self._hold(block_id)
        seq.block_table = list(cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        if self.prefix_caching and not seq.params.prompt_logprobs:
            self.queries += seq.num_tokens
            self.hits += seq.num_cached_tokens
        needed = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if self.seek_runs and needed > 0:
            planned = max(needed, self.blocks_for(seq.num_prompt_tokens + seq.max_tokens) - len(seq.block_table))
            run = self._free_run(planned) or self._free_run(needed) or []
            seq.block_table += [self._take(block_id) for block_id in run[:needed]]
            if run[needed:]:
                self._reservations[id(seq)] = run[needed:][::-1]
                self._reserved.update((block_id, id(seq)) for block_id in run[needed:])
        self.append(seq, seq.num_tokens)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can grow to `num_tokens` tokens (a block more when it crosses into one)."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take(self._next_block(seq)))

    # ---- after a step ---------------------------------------------------------------------------------------

    def publish(self, seq: Sequence) -> None:
        """Key every block of `seq` that its computed tokens filled, so later prompts can reuse it."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        parent = b""
        tokens = None
        for index, block_id in enumerate(seq.block_table[:full]):
            block = self.blocks[block_id]
            if block.key is None:
                tokens = tokens or seq.token_ids(0, full * self.block_size)
                chunk = tuple(tokens[index * self.block_size : (index + 1) * self.block_size])
                key = self.key_fn(parent, chunk)
                if key not in self._cached:  # an equal block cached already stays the one found
                    block.key, block.parent, block.tokens = key, parent, chunk
                    self._cached[key] = block_id
                parent = key
            else:
                parent = block.key

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past `seq`'s tokens, taken ahead for guesses that were rejected (speculative
        decoding): the cache then holds what it would without them (they were never published). On CPUs they
        stay reserved for `seq` to grow into, keeping its run."""
        keep = self.blocks_for(seq.num_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            if self._release(block_id) and self.seek_runs:  # popped last first: the next to grow into ends the list
                self._reservations.setdefault(id(seq), []).append(block_id)
                self._reserved[block_id] = id(seq)

    def free(self, seq: Sequence) -> None:
        """Give `seq`'s blocks back, the last ones first (least likely to be shared, so evicted first)."""
        for block_id in self._reservations.pop(id(seq), []):
            if self._reserved.get(block_id) == id(seq):
                del self._reserved[block_id]
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []

    # ---- blocks ---------------------------------------------------------------------------------------------

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            self._reserved.pop(block_id, None)
        block.ref_count += 1

    def _release(self, block_id: int) -> bool:
        """Drop a reference to the block; True when that freed it (it stays findable until its memory is needed)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
        return block.ref_count == 0

    def _next_block(self, seq: Sequence) -> int:
        """The free block `seq` grows into: its reservation's next, else the block after its last (a longer run),
        else the least recently freed one that nobody reserved, else any (taking it from a reservation)."""
        reservation = self._reservations.get(id(seq), [])
        while reservation:
            block_id = reservation.pop()
            if self._reserved.get(block_id) == id(seq):  # else taken by another, or held as a cached prefix
                return block_id
        if self.seek_runs and seq.block_table:
            after = seq.block_table[-1] + 1
            if after in self._free and after not in self._reserved:
                return after
        for block_id in self._free:
            if block_id not in self._reserved:
                return block_id
        return next(iter(self._free))

    def _free_run(self, length: int) -> list[int] | None:
        """The first `length` consecutive free blocks nobody reserved, preferring blocks that hold no cached
        prefix (taking those would evict it); None when there is no such run."""
        # Where the current run of free unreserved blocks starts, and the current run of those holding no prefix.
        any_start = uncached_start = previous = None
        fallback = None  # the first long enough run that evicts cached blocks
        for block_id in sorted(self._free):
            if block_id in self._reserved:
                any_start = uncached_start = None
                continue
            if previous != block_id - 1:
                any_start = uncached_start = None
            previous = block_id
            any_start = block_id if any_start is None else any_start
            if self.blocks[block_id].key is not None:
                uncached_start = None
            else:
                uncached_start = block_id if uncached_start is None else uncached_start
                if block_id - uncached_start + 1 == length:
                    return list(range(uncached_start, block_id + 1))
            if fallback is None and block_id - any_start + 1 == length:
                fallback = list(range(any_start, block_id + 1))
        return fallback

    def _take(self, block_id: int) -> int:
        """Free block `block_id`, its cached key evicted and any reservation of it dropped."""
        del self._free[block_id]
        self._reserved.pop(block_id, None)
        block = self.blocks[block_id]
        if block.key is not None:
            del self._cached[block.key]
            block.key, block.parent, block.tokens = None, b"", ()
        block.ref_count = 1
        return block_id
