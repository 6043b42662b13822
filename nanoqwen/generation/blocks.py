"""The block pool: which fixed-size KV blocks are free, who uses each one, and the prefix cache.

A row's keys and values live in blocks of `block_size` tokens, listed in its block table. A full block is keyed by
the hash of (its parent block's hash, its tokens), so the hash of a block names its whole prefix, and finding how
much of a new prompt is already cached is one dictionary lookup per block (vLLM's scheme). Blocks count their
users; a cached block nobody uses waits in an LRU list and is reused (its hash forgotten) only when no never-cached
block is left. Block 0 is the null block: rows write padding there and unused table entries point to it.
Pure bookkeeping: no tensors (the cache manager holds those).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

NULL_BLOCK = 0


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """The hash of each full block of `tokens`: sha256 over the parent block's hash and the block's tokens."""
    hashes, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = np.asarray(tokens[start:start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """num_blocks blocks (the null block included), of which the first `capacity` exist on the device; the pool
    grows capacity (by a quarter, up to num_blocks) only when no free or evictable block is left, so memory follows
    the tokens in flight. prefix_caching=False: blocks are never registered, so nothing is ever reused."""

    def __init__(self, num_blocks: int, capacity: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.prefix_caching = num_blocks, prefix_caching
        self.capacity = max(2, min(capacity, num_blocks))
        self.refs = [0] * num_blocks
        self.free = list(range(self.capacity - 1, 0, -1))  # a stack: the lowest ids come out first
        self.block_of: dict[bytes, int] = {}  # the prefix cache: block hash -> block
        self.hash_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self.peak_used = 0  # most blocks ever in use at once
        self.queried = self.hit = 0  # prompt blocks looked up in the prefix cache, and found
        self.evicted = 0  # cached blocks reused for other tokens

    @property
    def used(self) -> int:
        return self.capacity - 1 - len(self.free) - len(self.lru)

    def available(self) -> int:
        """Blocks that `allocate` can hand out now: free, cached but unused, or not yet allocated."""
        return len(self.free) + len(self.lru) + self.num_blocks - self.capacity

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of these block hashes (no reference taken)."""
        blocks = []
        for h in hashes if self.prefix_caching else []:
            block = self.block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """One more user of each of these (cached) blocks."""
        for block in blocks:
            if self.refs[block] == 0:
                self.lru.pop(block, None)
            self.refs[block] += 1
        self.peak_used = max(self.peak_used, self.used)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks with one user each: free ones first, then the least recently used cached ones (their hashes
        forgotten), then new capacity, so memory grows only with the blocks in use. None (and nothing taken) when
        fewer than n are available."""
        if n > self.available():
            return None
        blocks = []
        for _ in range(n):
            if not self.free and not self.lru:
                self._grow()
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.lru.popitem(last=False)
                del self.block_of[self.hash_of.pop(block)]
                self.evicted += 1
            self.refs[block] = 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.used)
        return blocks

    def _grow(self) -> None:
        new = min(self.num_blocks, self.capacity + max(self.capacity // 4, 1))  # a quarter: little left unused
        self.free = list(range(new - 1, self.capacity - 1, -1)) + self.free
        self.capacity = new

    def release(self, blocks: list[int]) -> None:
        """One user less for each block; an unused cached block joins the LRU list, an uncached one is free."""
        for block in blocks:
            if block == NULL_BLOCK:
                continue
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.lru[block] = None
                else:
                    self.free.append(block)

    def register(self, block: int, h: bytes) -> None:
        """A full block's contents are final: cache it under its hash (unless that hash already has a block)."""
        if self.prefix_caching and h not in self.block_of and block not in self.hash_of:
            self.block_of[h], self.hash_of[block] = block, h

    def forget(self) -> None:
        """Drop the whole prefix cache (the model's weights changed: cached keys are stale)."""
        self.free += [block for block in self.lru]
        self.lru.clear()
        self.block_of.clear()
        self.hash_of.clear()
