"""Speculative decoding with prompt-lookup or multi-token-prediction drafts: several tokens per row from one forward,
the tokens of plain decoding all the same.

Each row reads its next token followed by its drafted ones at consecutive positions, then keeps the drafts up to
the first one that differs from what it chooses at that position from the model's logits. The choice is the one a
plain step would make (the same sampler, penalties, forced tokens and random draws), so the tokens are those of
plain decoding, seeded sampling included; a good draft only makes them come faster. A row's keys past what it kept
are simply overwritten by its next step (they lie beyond its length, masked until then); a DeltaNet state goes back
to its value after the last kept token.

Drafts come from prompt lookup ("ngram": the text so far) or from Qwen3-Next's MTP head ("mtp", `MTPDrafter`).
"""
from __future__ import annotations

import contextlib

import torch

from .cache import KVCache, paged_view
from .sampling import device_tensor


class PromptLookup:
    """Prompt-lookup drafts (vLLM's "ngram" method, transformers' prompt_lookup_num_tokens) for one growing text:
    find the latest earlier occurrence of the text's last n tokens, for the longest n <= max_n that has one, and
    propose the k tokens that followed it. Keeps a map from each n-gram to where its latest occurrence ends,
    extended by the new tokens at each call, so a call costs what the text grew by, not its length."""

    def __init__(self, max_n: int = 3):
        self.max_n, self.ends, self.indexed = max_n, {}, 0

    def draft(self, text: list[int], k: int) -> list[int]:
        for end in range(self.indexed, len(text) - 1):  # n-grams ending before the last token: something follows
            for n in range(1, min(self.max_n, end + 1) + 1):
                self.ends[tuple(text[end + 1 - n:end + 1])] = end + 1
        self.indexed = max(self.indexed, len(text) - 1)
        for n in range(min(self.max_n, len(text)), 0, -1):
            follows = self.ends.get(tuple(text[-n:]))
            if follows is not None:
                return text[follows:follows + k]
        return []


def draft_tokens(row, k: int) -> list[int]:
    """Up to k tokens that may follow a row's text so far (prompt lookup; the row keeps its lookup table)."""
    if row.lookup is None:
        row.lookup = PromptLookup()
    return row.lookup.draft(row.request.prompt_ids + row.token_ids, k)


def speculative_step(engine) -> list:
    """One speculative step of every decoding row of `engine`; returns the chunks produced."""
    cache = engine.cache
    drafts = engine.drafter.draft(engine.decoding_slots()) if engine.drafter else \
        {slot: engine.draft(slot) for slot in engine.decoding_slots()}
    for slot in drafts:  # no draft may run past the row's room
        drafts[slot] = drafts[slot][:max(0, engine.max_len - 1 - cache.lengths[slot])]
    engine.reserve({slot: len(draft) + 1 for slot, draft in drafts.items()})  # may preempt the newest rows
    slots = engine.decoding_slots()
    drafts = {slot: drafts[slot] for slot in slots}
    rows = [engine.rows[slot] for slot in slots]
    with capture_hidden(engine.model) if engine.drafter else contextlib.nullcontext() as hidden:
        logits = _forward(engine, slots, drafts)
    kept = torch.zeros(len(slots), dtype=torch.long)  # drafts kept per row
    chunks, active = [], list(range(len(slots)))
    for j in range(logits.shape[1]):  # position j chooses the token after the j-th fed one, as plain decoding would
        chunks += engine.choose([slots[i] for i in active], logits[active, j])
        going = []
        for i in active:
            draft, row = drafts[slots[i]], rows[i]
            if engine.rows[slots[i]] is row and j < len(draft) and row.token_ids[-1] == draft[j]:
                kept[i] = j + 1  # the draft was right: its key is valid and the row chooses again
                going.append(i)
        active = going
        if not active:
            break
    if engine.drafter:  # the main model's hidden states at the fed tokens it kept, for the MTP head's next step
        for i, (slot, row) in enumerate(zip(slots, rows)):
            if engine.rows[slot] is row:
                engine.drafter.record(slot, cache.lengths[slot], hidden[0][i, :int(kept[i]) + 1])
    _keep(engine, slots, rows, kept)
    engine.drafted += sum(map(len, drafts.values()))
    engine.accepted += int(kept.sum())
    return chunks


def _forward(engine, slots: list[int], drafts: dict) -> torch.Tensor:
    """Every row reads its next token and its drafts (padded to the longest) in one forward: the logits
    (rows, k+1, vocab) in fp32."""
    cache, device = engine.cache, engine.device
    k = max(len(draft) for draft in drafts.values())
    index = device_tensor(slots, torch.long, device)
    fed = torch.zeros(len(slots), k + 1, dtype=torch.long)
    fed[:, 0] = engine.tokens[index].cpu()
    for i, slot in enumerate(slots):
        fed[i, 1:1 + len(drafts[slot])] = torch.tensor(drafts[slot], dtype=torch.long)
    lengths = [cache.lengths[slot] for slot in slots]
    positions = device_tensor(lengths, torch.long, device)[:, None] + torch.arange(k + 1, device=device)
    width = max(-(-(n + k + 1) // cache.block_size) for n in lengths)
    counts = device_tensor([len(drafts[slot]) + 1 for slot in slots], torch.long, device)
    # DeltaNet states keep their value after each token, to return to the last accepted one
    view = paged_view(cache.layers, cache.table[index, :width], positions, cache.block_size, index, counts,
                      record_every=1)
    out = engine.model(fed.to(device), position_ids=positions, cache=view, fused=engine.decoder.fused)
    return out.logits[..., :engine.token_limit].float()


def _keep(engine, slots: list[int], rows: list, kept: torch.Tensor) -> None:
    """Each row keeps its next token and kept[row] drafts: its length moves past them, DeltaNet states go back."""
    cache = engine.cache
    for layer in cache.layers:
        layer.keep(kept.to(engine.device))
    for slot, row, n in zip(slots, rows, kept.tolist()):
        if engine.rows[slot] is row:  # (a row that finished during the step has given its blocks back)
            cache.lengths[slot] += n + 1
            cache.positions[slot] += n + 1
    engine.launches += 1


# ----------------------------------------------------------------------------------------------------------------
# Drafts from Qwen3-Next's multi-token-prediction head

@contextlib.contextmanager
def capture_hidden(model):
    """Inside: the list holds the final normed hidden states (B, T, H) of each forward of `model`, all positions
    (the input of its lm_head, which the MTP head reads)."""
    captured = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, inputs, out: captured.append(out[0]))
    try:
        yield captured
    finally:
        hook.remove()
        captured[:] = [model.model.norm(h) for h in captured]


class MTPDrafter:
    """k drafts per row chained through the MTP head (models/qwen3_next.MultiTokenPredictor), over its own KV cache.

    The head's position t reads the main model's hidden state at t and token t+1, so its key at t can be written once
    token t+1 is chosen. Each row keeps the main model's hidden states it has not caught up on (`record`): from the
    prefill, then the kept tokens of each step. A draft step first runs the head over those (true keys, written in
    the row's blocks; the last output predicts the first draft), then chains k-1 more single-token steps on its own
    outputs. The chained keys sit past the row's caught-up length and are overwritten by the next catch-up, so
    rejected drafts leave nothing behind. The head's keys share the engine's block table (a slot per position)."""

    def __init__(self, engine):
        model = engine.model
        if getattr(model, "mtp", None) is None:
            raise ValueError("speculative='mtp' needs a model with a multi-token-prediction head (a Qwen3-Next "
                             "checkpoint with mtp.* weights, or a nano-next-* preset)")
        self.engine, self.model, self.k = engine, model, engine.num_speculative_tokens
        c, p = model.config, model.lm_head.weight
        self.layers = {c.num_hidden_layers + i: KVCache(engine.cache.grown, engine.block_size, c.num_key_value_heads,
                                                        c.head_dim, p.dtype, p.device)
                       for i in range(c.num_nextn_predict_layers)}
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> (first position, hidden states from it)

    def record(self, slot: int, start: int, hidden: torch.Tensor) -> None:
        """The main model's final hidden states (n, H) of a row's positions start..start+n-1 (after a prefill, or
        the kept tokens of a step), for the next draft step to catch up on."""
        self.pending[slot] = (start, hidden)

    @torch.no_grad()
    def draft(self, slots: list[int]) -> dict[int, list[int]]:
        """Up to k draft tokens for each row: catch up on its recorded positions, then chain."""
        slots = [s for s in slots if s in self.pending]
        drafts = {s: [] for s in self.engine.decoding_slots()}
        if not slots:
            return drafts
        self._grow()
        engine, cache = self.engine, self.engine.cache
        h, position = self._catch_up(slots)
        for depth in range(self.k):
            token = self.model.lm_head(h)[..., :engine.token_limit].argmax(-1)  # (rows, 1)
            for i, slot in enumerate(slots):
                drafts[slot].append(int(token[i, 0]))
            if depth + 1 < self.k:
                position = position + 1
                if int(position.max()) >= cache.max_blocks * engine.block_size:
                    break  # past the block table (the drafts would be cut to the rows' room anyway)
                h = self._run(slots, token, h, position, None, depth=depth + 1)
        return drafts

    def _catch_up(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head over each row's recorded positions (its true keys); returns the output at each row's last
        one (rows, 1, H), whose logits give the first draft, and that position (rows, 1)."""
        engine = self.engine
        starts = [self.pending[s][0] for s in slots]
        counts = [self.pending[s][1].shape[0] for s in slots]
        hidden = torch.nn.utils.rnn.pad_sequence([self.pending[s][1] for s in slots], batch_first=True)
        tokens = torch.zeros(len(slots), hidden.shape[1], dtype=torch.long)
        for i, (slot, start, n) in enumerate(zip(slots, starts, counts)):  # the token after each position
            row = engine.rows[slot]
            tokens[i, :n] = torch.tensor((row.request.prompt_ids + row.token_ids)[start + 1:start + 1 + n])
        lengths = device_tensor(counts, torch.long, engine.device)
        positions = device_tensor(starts, torch.long, engine.device)[:, None] + \
            torch.arange(hidden.shape[1], device=engine.device)
        out = self._run(slots, tokens.to(engine.device), hidden, positions, lengths, depth=0)
        for slot in slots:
            del self.pending[slot]
        last = lengths - 1
        return out[torch.arange(len(slots), device=engine.device), last][:, None], positions.gather(1, last[:, None])

    def _run(self, slots, tokens, hidden, positions, lengths, depth: int) -> torch.Tensor:
        """The head over (rows, T) tokens and the hidden states before them, its keys into the rows' blocks."""
        engine = self.engine
        index = device_tensor(slots, torch.long, engine.device)
        width = int(positions.max()) // engine.block_size + 1
        view = paged_view(self.layers, engine.cache.table[index, :width], positions, engine.block_size, index, lengths)
        cos, sin = self.model.rope(positions, hidden.dtype)
        out, _ = self.model.mtp(self.model.model.embed_tokens(tokens), hidden, cos, sin, view.attention_mask, view,
                                depth=depth)
        return out

    def _grow(self) -> None:
        for layer in self.layers.values():  # the engine's block pool grew: so does the head's
            if layer.k.shape[1] < self.engine.cache.grown:
                layer.grow(self.engine.cache.grown)
