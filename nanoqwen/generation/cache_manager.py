"""Where each row's tokens live: a paged KV cache with prefix caching.

Keys and values are stored in fixed-size blocks (`block_size` tokens) of one pool per attention layer; row r's
tokens are in the blocks its block table lists (`table[r]`, a static device buffer, and `blocks[r]` on the host).
Memory follows the tokens in flight: a row takes a block when its tokens reach one, and gives its blocks back when
it ends; eager engines grow the pool as blocks are first needed, static ones (compiled, CUDA graphs) allocate it
whole. The number of rows decoding together is bounded by the blocks, not by rows x max_len.

Prefix caching (blocks.py): the full blocks of every prompt are registered under the hash of their prefix, so a
later prompt that starts the same way (a system prompt, the earlier turns of a chat) takes those blocks and
computes only the rest. Qwen3-Next's DeltaNet state has no blocks: a prefill records it every `snapshot_every`
tokens (a multiple of the block size) and keeps a bounded LRU of these snapshots by block hash, so the hybrid
reuses prefixes too, from the last snapshot a prompt reaches.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .blocks import NULL_BLOCK, BlockPool, block_hashes
from .cache import make_cache, paged_view
from .sampling import device_tensor

PREFILL_CHUNK = 4096  # long prompts are prefilled in pieces so the attention mask stays small
DELTA_CHUNK = 64  # the gated delta rule's chunk length: DeltaNet snapshots are taken at multiples of it
INITIAL_BLOCKS = 16  # an eager pool starts this small and grows by a quarter when it runs out


class PagedCache:
    """The KV blocks of `rows` engine rows of up to max_len tokens each. num_blocks (default: enough for every
    row to reach max_len) or kv_cache_memory_bytes caps the pool; static=True allocates it whole at once."""

    def __init__(self, model, rows: int, max_len: int, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, prefix_caching: bool = True, static: bool = False):
        if block_size < 1 or block_size & (block_size - 1) or block_size > PREFILL_CHUNK:
            raise ValueError(f"block_size must be a power of two between 1 and {PREFILL_CHUNK}, got {block_size}")
        config = model.config
        self.model, self.rows, self.max_len, self.block_size = model, rows, max_len, block_size
        self.device = model.lm_head.weight.device
        self.max_blocks = -(-max_len // block_size)  # block table width
        self.block_bytes = sum(2 * config.num_key_value_heads * config.head_dim * block_size *
                               model.lm_head.weight.element_size()
                               for i in range(config.num_hidden_layers) if not config.is_linear_layer(i))
        if num_blocks is None and kv_cache_memory_bytes:
            num_blocks = kv_cache_memory_bytes // self.block_bytes
        if num_blocks is None:
            num_blocks = rows * self.max_blocks + 1  # every row can reach max_len
        capacity = num_blocks if static else INITIAL_BLOCKS
        self.pool = BlockPool(num_blocks, capacity, prefix_caching)
        self.layers = make_cache(model, rows, self.pool.capacity, block_size)
        self.grown = self.pool.capacity  # blocks the layers' tensors hold
        self.table = torch.zeros(rows, self.max_blocks, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)  # tokens with keys, per row
        self.blocks: list[list[int]] = [[] for _ in range(rows)]
        self.lengths = [0] * rows  # host copy of positions
        self.hybrid = config.is_hybrid
        self.snapshot_every = math.lcm(block_size, DELTA_CHUNK) if self.hybrid else 0
        self.snapshots: OrderedDict[bytes, list] = OrderedDict()  # block hash -> DeltaNet states after that block
        self.max_snapshots = self._snapshot_budget(config, num_blocks) if self.hybrid else 0

    def _snapshot_budget(self, config, num_blocks: int) -> int:
        """Snapshots kept: at most a quarter of the KV pool's memory, and at least 4."""
        c = config
        per_layer = c.linear_conv_dim * (c.linear_conv_kernel_dim - 1) * self.model.lm_head.weight.element_size() + \
            c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
        total = per_layer * sum(c.is_linear_layer(i) for i in range(c.num_hidden_layers))
        return max(4, num_blocks * self.block_bytes // (4 * total))

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a decode step reads and writes in place."""
        return [self.table, self.positions] + [b for layer in self.layers for b in layer.buffers()]

    @property
    def allocated_bytes(self) -> int:
        """KV memory allocated now (the pool as it has grown)."""
        return self.pool.capacity * self.block_bytes

    # --- admitting rows ---
    def cached_prefix(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks `tokens` can start from, and the hashes of its full blocks. At least one token is left
        to compute (its logits are needed); for the hybrid the prefix ends where a DeltaNet snapshot was taken."""
        hashes = block_hashes(tokens, self.block_size)
        hit = self.pool.match(hashes[:(len(tokens) - 1) // self.block_size])
        if self.hybrid:
            every = self.snapshot_every // self.block_size
            while hit and (len(hit) % every or hashes[len(hit) - 1] not in self.snapshots):
                hit = hit[:-1]
        return hit, hashes

    def blocks_needed(self, tokens: list[int], room: int = 0) -> int:
        """Blocks that admitting `tokens`, with room for `room` more, would take from the pool: new ones, and
        cached ones nobody uses."""
        hit, _ = self.cached_prefix(tokens)
        total = -(-(len(tokens) + room) // self.block_size)
        return total - len(hit) + sum(self.pool.refs[b] == 0 for b in hit)

    def admit(self, row: int, tokens: list[int]) -> int:
        """Give a row the blocks of `tokens`: the cached prefix's, new ones for the rest. Returns the number of
        tokens already cached (the prefill starts there)."""
        hit, hashes = self.cached_prefix(tokens)
        self.pool.queried += len(tokens) // self.block_size
        self.pool.hit += len(hit)
        self.pool.take(hit)
        new = self.pool.allocate(-(-len(tokens) // self.block_size) - len(hit))
        if new is None:
            self.pool.release(hit)
            raise RuntimeError(f"no room in the KV cache for {len(tokens)} tokens")
        self._set_blocks(row, hit + new)
        start = len(hit) * self.block_size
        self.lengths[row] = start
        for layer in self.layers:
            layer.reset([row])
        if hit and self.hybrid:
            self.snapshots.move_to_end(hashes[len(hit) - 1])
            for layer, state in zip(self.layers, self.snapshots[hashes[len(hit) - 1]]):
                layer.restore(row, state)
        return start

    def reserve(self, row: int, length: int) -> bool:
        """Make sure the row has blocks for its first `length` tokens; False when the pool has too few."""
        need = -(-length // self.block_size) - len(self.blocks[row])
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        self._set_blocks(row, self.blocks[row] + new)
        return True

    def release(self, row: int, tokens: list[int]) -> None:
        """A row is done (or set aside): register its full blocks, as far as their keys are written (a row's last
        chosen token has none yet), and give its blocks back."""
        for block, h in zip(self.blocks[row], block_hashes(tokens[:self.lengths[row]], self.block_size)):
            self.pool.register(block, h)
        self.pool.release(self.blocks[row])
        self.blocks[row], self.lengths[row] = [], 0
        self.table[row] = NULL_BLOCK
        self.positions[row] = 0

    def forget(self) -> None:
        """Drop every cached prefix (the model's weights changed)."""
        self.pool.forget()
        self.snapshots.clear()

    def _set_blocks(self, row: int, blocks: list[int]) -> None:
        old, self.blocks[row] = len(self.blocks[row]), blocks
        if self.pool.capacity > self.grown:  # the pool grew: so do the layers' tensors
            for layer in self.layers:
                layer.grow(self.pool.capacity)
            self.grown = self.pool.capacity
        if len(blocks) > old:
            self.table[row, old:len(blocks)] = device_tensor(blocks[old:], torch.long, self.device)

    # --- running prompts ---
    def prefill(self, rows: list[int], prompts: list[list[int]], starts: list[int], fused=None) -> torch.Tensor:
        """Run each prompt from its start (its cached prefix is not run again), right-padded into one batch, in
        pieces of PREFILL_CHUNK tokens: keys go into the rows' blocks, states into their rows. The prompts' full
        blocks are then registered in the prefix cache. Returns the logits of each prompt's last token
        (len(rows), vocab) in fp32."""
        counts = [len(p) - s for p, s in zip(prompts, starts)]
        ids = torch.zeros(len(rows), max(counts), dtype=torch.long)
        for i, (prompt, start) in enumerate(zip(prompts, starts)):
            ids[i, :counts[i]] = torch.tensor(prompt[start:])
        ids, index = ids.to(self.device), device_tensor(rows, torch.long, self.device)
        table = self.table[index, :max(-(-len(p) // self.block_size) for p in prompts)]
        hashes = [block_hashes(p, self.block_size) for p in prompts]
        logits = [None] * len(rows)
        for c0 in range(0, max(counts), PREFILL_CHUNK):
            c1 = min(c0 + PREFILL_CHUNK, max(counts))
            real = [min(max(n - c0, 0), c1 - c0) for n in counts]  # real tokens of each row in this piece
            positions = device_tensor(starts, torch.long, self.device)[:, None] + \
                torch.arange(c0, c1, device=self.device)
            lengths = device_tensor(real, torch.long, self.device)
            view = paged_view(self.layers, table, positions, self.block_size, index, lengths, self.snapshot_every)
            out = self.model(ids[:, c0:c1], position_ids=positions, cache=view, fused=fused,
                             logits_to_keep=(lengths - 1).clamp(min=0))
            for i, n in enumerate(counts):
                if c0 < n <= c1:
                    logits[i] = out.logits[i, 0].float()
            if self.hybrid:
                self._take_snapshots(hashes, starts, real, c0)
        for row, prompt, row_hashes in zip(rows, prompts, hashes):
            self.lengths[row] = len(prompt)
            for block, h in zip(self.blocks[row], row_hashes):
                self.pool.register(block, h)
        self.positions[index] = device_tensor([len(p) for p in prompts], torch.long, self.device)
        return torch.stack(logits)

    def _take_snapshots(self, hashes: list[list[bytes]], starts: list[int], real: list[int], c0: int) -> None:
        """After a piece of a prefill: keep the DeltaNet states each row recorded at a snapshot boundary."""
        every = self.snapshot_every
        for i, (row_hashes, start, n) in enumerate(zip(hashes, starts, real)):
            for j in range(n // every):
                h = row_hashes[(start + c0 + (j + 1) * every) // self.block_size - 1]
                if h not in self.snapshots:
                    self.snapshots[h] = [layer.saved(i, j) for layer in self.layers]
        while len(self.snapshots) > self.max_snapshots:
            self.snapshots.popitem(last=False)
