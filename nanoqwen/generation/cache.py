"""The per-layer caches of cached inference, and the one protocol between them, the model and the engine.

The model sees a `CacheView`: what one forward reads and writes. An attention layer calls
`cache.update(k, v, layer_idx)` and attends to the keys and values it returns under `cache.attention_mask`; a
DeltaNet layer (Qwen3-Next) reads where its rows start with `cache.read_state(layer_idx)` and hands back where they
end with `cache.write_state(layer_idx, ...)`. The model keeps nothing between forwards.

Keys and values live in fixed-size blocks: one pool of blocks per attention layer, a token's slot is block *
block_size + offset, and each row lists its blocks in a block table (cache_manager.py). A view carries the slots
this forward writes and the blocks each row reads, so the model never sees blocks. DeltaNet states have no
positions: one state per engine row, saved and restored whole.

The engine's cache manager owns one `LayerCache` per layer (`make_cache`) and handles them only through the methods
of `LayerCache`, whatever the kind of layer: `KVCache` and `DeltaNetState` implement them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


@dataclass
class CacheView:
    """What one forward reads and writes: the protocol the model programs against.

    The cache manager fills the fields; the model calls the three methods and reads `attention_mask` and `valid`."""
    layers: Sequence["LayerCache"]
    attention_mask: torch.Tensor  # (B, 1, T, S) bool: which of the keys `update` returns each query sees
    write_index: torch.Tensor  # (B*T,) the pool slot of each new token's key (padding: the null block)
    read_blocks: torch.Tensor  # (B, S / block_size) the blocks holding each row's keys, in position order
    rows: torch.Tensor | None = None  # (B,) the engine rows these are (DeltaNet states); None: all rows, in order
    valid: torch.Tensor | None = None  # (B, T) real tokens; the rest is right padding (None: all real)
    lengths: torch.Tensor | None = None  # (B,) real tokens per row, valid.sum(1) (None: all T)
    record_every: int = 0  # DeltaNet states also keep their value every this many tokens (see LayerCache)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys and values (B, heads, T, head_dim); return all those to attend to
        (B, heads, S, head_dim)."""
        return self.layers[layer_idx].update(self, k, v)

    def read_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A DeltaNet layer's start: the last K-1 conv inputs (B, C, K-1) and the recurrent state (B, H, Dk, Dv)."""
        return self.layers[layer_idx].read(self)

    def write_state(self, layer_idx: int, conv_inputs: torch.Tensor, recurrent: torch.Tensor,
                    recorded: torch.Tensor | None = None) -> None:
        """A DeltaNet layer's end: its conv inputs, the K-1 before this forward first (B, C, K-1+T), the final
        recurrent state, and (record_every > 0) the states after every record_every tokens (B, n, H, Dk, Dv)."""
        self.layers[layer_idx].write(self, conv_inputs, recurrent, recorded)


def paged_view(layers, table: torch.Tensor, positions: torch.Tensor, block_size: int, rows=None, lengths=None,
               record_every: int = 0) -> CacheView:
    """The view of a forward in which row b reads tokens at positions[b] (B, T), its keys in the blocks listed by
    table[b] (B, blocks); lengths (B,): the real tokens of each row, the rest is padding (None: all real). Each
    query sees the row's keys up to its own position: the cached prefix and this forward's tokens."""
    B, T = positions.shape
    S = table.shape[1] * block_size
    block = (positions // block_size).clamp(max=table.shape[1] - 1)  # (padding may run past the table)
    write = table.gather(1, block) * block_size + positions % block_size
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=table.device) < lengths[:, None]
        write = torch.where(valid, write, 0)  # padding writes into the null block, which no row reads as real
    key = torch.arange(S, device=table.device)
    mask = (key[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
    return CacheView(layers, mask, write.reshape(-1), table, rows, valid, lengths, record_every)


class LayerCache(nn.Module):
    """One layer's inference state. The model reaches it through a CacheView; the engine's cache manager through
    these methods, which every kind of layer implements (a method that means nothing for a kind does nothing):

    - grow(blocks): make room for `blocks` blocks (the block pool grew);
    - reset(rows): new requests start in these rows from nothing;
    - keep(kept): after a forward viewed with record_every=1 (a speculative step), its row b keeps what it had
      after its token kept[b] and forgets the rest;
    - saved(b, j): after a forward viewed with record_every=R, the state of its row b after (j+1)*R tokens (a
      prefix-cache snapshot; None when the layer needs none: keys stay in their blocks);
    - restore(row, state): a row starts from a snapshot taken by saved().
    """

    def update(self, view: CacheView, k: torch.Tensor, v: torch.Tensor):
        raise TypeError(f"{type(self).__name__} holds no keys and values")

    def read(self, view: CacheView):
        raise TypeError(f"{type(self).__name__} holds no recurrent state")

    def write(self, view: CacheView, conv_inputs, recurrent, recorded) -> None:
        raise TypeError(f"{type(self).__name__} holds no recurrent state")

    def grow(self, blocks: int) -> None:
        pass

    def reset(self, rows: list[int]) -> None:
        pass

    def keep(self, kept: torch.Tensor) -> None:
        pass

    def saved(self, b: int, j: int):
        return None

    def restore(self, row: int, state) -> None:
        pass


class KVCache(LayerCache):
    """The keys and values of one attention layer: a pool of blocks per head (kv_heads, blocks, block_size,
    head_dim), written in place at the view's write slots and read a whole block at a time, straight into the
    (B, heads, S, head_dim) layout attention takes (one copy). Keys past a row's length are masked out, never read,
    so nothing needs resetting and a speculative step's rejected drafts need no undo."""

    def __init__(self, blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (num_kv_heads, blocks, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("heads", torch.arange(num_kv_heads, device=device)[None, :, None], persistent=False)

    def update(self, view: CacheView, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape
        for pool, new in ((self.k, k), (self.v, v)):  # a token's slot is block * block_size + offset
            new = new.transpose(0, 1).reshape(H, B * T, D).to(pool.dtype)
            pool.view(H, -1, D).index_copy_(1, view.write_index, new)
        H, N, block_size, _ = self.k.shape  # read: block b of head h is row h * N + b of the pool's blocks
        rows = (self.heads * N + view.read_blocks[:, None, :]).reshape(-1)  # (B, H, n) in that order
        S = view.read_blocks.shape[1] * block_size
        return tuple(pool.view(H * N, block_size, D).index_select(0, rows).view(B, H, S, D)
                     for pool in (self.k, self.v))

    def grow(self, blocks: int) -> None:
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], blocks, *old.shape[2:])
            new[:, :old.shape[1]] = old
            setattr(self, name, new)


class DeltaNetState(LayerCache):
    """One Gated DeltaNet layer's state per engine row: the last K-1 conv inputs and the recurrent state (fp32).
    A recorded forward's states are kept until the next forward, for keep() and saved()."""

    def __init__(self, rows: int, config, dtype, device=None):
        super().__init__()
        c = config
        self.register_buffer("conv", torch.zeros(rows, c.linear_conv_dim, c.linear_conv_kernel_dim - 1,
                                                 dtype=dtype, device=device), persistent=False)
        self.register_buffer("recurrent", torch.zeros(rows, c.linear_num_value_heads, c.linear_key_head_dim,
                                                      c.linear_value_head_dim, dtype=torch.float32, device=device),
                             persistent=False)
        self.recorded = None  # (view, conv inputs, recorded states) of the last recorded forward

    def read(self, view: CacheView):
        if view.rows is None:
            return self.conv, self.recurrent
        return self.conv[view.rows], self.recurrent[view.rows]

    def write(self, view: CacheView, conv_inputs, recurrent, recorded) -> None:
        K1 = self.conv.shape[2]
        if view.lengths is None:
            conv = conv_inputs[:, :, -K1:]
        else:  # the K-1 inputs before each row's padding
            conv = conv_inputs.gather(2, self._window(view.lengths, conv_inputs.shape[1]))
        self._set(view.rows, conv, recurrent)
        self.recorded = (view, conv_inputs, recorded) if view.record_every else None

    def _window(self, ends: torch.Tensor, channels: int) -> torch.Tensor:
        """Gather indices (B, C, K-1) of the K-1 conv inputs before token ends[b] (in conv-input coordinates)."""
        K1 = self.conv.shape[2]
        index = ends[:, None] + torch.arange(K1, device=ends.device)
        return index[:, None, :].expand(-1, channels, K1)

    def _set(self, rows, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        if rows is None:
            self.conv.copy_(conv)
            self.recurrent.copy_(recurrent)
        else:
            self.conv.index_copy_(0, rows, conv.to(self.conv.dtype))
            self.recurrent.index_copy_(0, rows, recurrent)

    def reset(self, rows: list[int]) -> None:
        self.conv[rows] = 0
        self.recurrent[rows] = 0

    def keep(self, kept: torch.Tensor) -> None:
        view, conv_inputs, states = self.recorded
        recurrent = states[torch.arange(states.shape[0], device=kept.device), kept]
        self._set(view.rows, conv_inputs.gather(2, self._window(kept + 1, conv_inputs.shape[1])), recurrent)
        self.recorded = None

    def saved(self, b: int, j: int):
        view, conv_inputs, states = self.recorded
        end = (j + 1) * view.record_every
        return conv_inputs[b, :, end:end + self.conv.shape[2]].clone(), states[b, j].clone()

    def restore(self, row: int, state) -> None:
        self.conv[row], self.recurrent[row] = state


def make_cache(model, rows: int, blocks: int, block_size: int, dtype=None, device=None) -> nn.ModuleList:
    """One LayerCache per layer of `model`: a DeltaNetState for `rows` rows for each linear-attention layer of the
    hybrid, a KVCache of `blocks` blocks of `block_size` tokens for every other layer."""
    c, p = model.config, model.lm_head.weight
    dtype, device = dtype or p.dtype, device or p.device
    return nn.ModuleList(
        DeltaNetState(rows, c, dtype, device) if c.is_linear_layer(i) else
        KVCache(blocks, block_size, c.num_key_value_heads, c.head_dim, dtype, device)
        for i in range(c.num_hidden_layers))
