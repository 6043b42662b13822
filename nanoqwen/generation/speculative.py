"""Speculative decoding with prompt-lookup drafts: several tokens per row from one forward, the tokens of plain
decoding all the same.

Each row reads its next token followed by its drafted ones at consecutive positions, then keeps the drafts up to
the first one that differs from what it chooses at that position from the model's logits. The choice is the one a
plain step would make (the same sampler, penalties, forced tokens and random draws), so the tokens are those of
plain decoding, seeded sampling included; a good draft only makes them come faster. A row's keys past what it kept
are simply overwritten by its next step (they lie beyond its length, masked until then); a DeltaNet state goes back
to its value after the last kept token.
"""
from __future__ import annotations

import torch

from .cache import paged_view
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
    drafts = {}
    for slot in engine.decoding_slots():  # no draft may run past the row's room
        drafts[slot] = engine.draft(slot)[:max(0, engine.max_len - 1 - cache.lengths[slot])]
    engine.reserve({slot: len(draft) + 1 for slot, draft in drafts.items()})  # may preempt the newest rows
    slots = engine.decoding_slots()
    drafts = {slot: drafts[slot] for slot in slots}
    rows = [engine.rows[slot] for slot in slots]
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
