"""The sampler against independent references: transformers' logits processors and warpers (repetition penalty,
temperature, top-k, top-p, min-p, applied in generate()'s order) and the OpenAI/vLLM definition of the presence
penalty, on random logits with negative values, tokens seen in the prompt and in the output, and ties at the top-p
edge. Our documented choices stay explicit: the presence penalty counts generated tokens only (OpenAI, vLLM), the
repetition penalty the prompt too (transformers, vLLM); top-k keeps exactly k tokens where transformers and vLLM
keep every token tied with the k-th."""
import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from nanoqwen.generation.sampling import Sampler, SamplingParams

V = 64  # a small vocabulary: penalties and filters change much of the distribution

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_distribution(logits, p: SamplingParams, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The next-token distribution by transformers' processors and warpers (generate()'s order), with the presence
    penalty as OpenAI and vLLM define it: subtracted once from the logit of every token already generated."""
    scores = logits[None].clone()
    if p.repetition_penalty != 1:  # transformers counts every token of the sequence so far, the prompt included
        seen = torch.tensor([prompt + generated])
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, scores)
    if p.presence_penalty:
        scores[0, sorted(set(generated))] -= p.presence_penalty
    if p.temperature == 0:
        return torch.nn.functional.one_hot(scores[0].argmax(), V).float()
    ids = torch.tensor([prompt + generated])
    warpers = [TemperatureLogitsWarper(p.temperature)]
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0 else []
    for warp in warpers:
        scores = warp(ids, scores)
    return scores[0].softmax(-1)


def our_distribution(sampler: Sampler, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """(rows, V): the probabilities the sampler draws each row's next token from (its inverse-CDF draw picks
    candidates in this order); greedy rows put all mass on the argmax after the penalties."""
    index = torch.tensor(rows)
    penalized = sampler._penalize(logits, index) if sampler.generated is not None else logits
    K = max(sampler.params[r].top_k or V for r in rows)
    candidates, probs = sampler._filter(penalized, index, K)
    out = torch.zeros(len(rows), V).scatter_(1, candidates, probs)
    for i, r in enumerate(rows):
        if sampler.params[r].temperature == 0:
            out[i] = torch.nn.functional.one_hot(penalized[i].argmax(), V).float()
    return out


# Each row: its settings, its prompt and the tokens it has generated so far (overlapping, with repeats).
ROWS = [
    (dict(temperature=1.5, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.3), range(0, 12), [3, 40, 41, 41]),
    (dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0), range(5, 9), [7, 8]),
    (dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5), range(10, 30), [12, 50, 51]),
    (dict(temperature=1.0, top_p=0.7, top_k=0, min_p=0.05, presence_penalty=-0.5, repetition_penalty=0.8),
     range(20, 40), [20, 21, 60]),
    (dict(temperature=0.3, top_p=1.0, top_k=5, min_p=0.2, repetition_penalty=2.0), range(0, 64, 3), [1, 2]),
    (dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.5, presence_penalty=2.0),
     range(30, 34), [33, 35]),
    (dict(temperature=1.2, top_p=0.5, top_k=40, min_p=0.1, presence_penalty=0.7, repetition_penalty=1.1), [],
     [5, 5, 9, 63]),
    (dict(temperature=2.0, top_p=1.0, top_k=0, min_p=0.3), range(40, 50), [41]),  # min-p alone decides
    (dict(temperature=1.5, top_p=1.0, top_k=7, min_p=0.0, repetition_penalty=1.2), range(0, 5), [60, 61]),  # top-k
]


def sampler_with(rows, batch_size=None) -> Sampler:
    sampler = Sampler(batch_size or len(rows), V, "cpu")
    for r, (settings, prompt, generated) in enumerate(rows):
        sampler.set_row(r, SamplingParams(seed=r, **settings).resolved(True), list(prompt))
    for step in range(max(len(generated) for _, _, generated in rows)):  # one token per row and step, as decoding
        sampler.observe(*zip(*[(r, g[step]) for r, (_, _, g) in enumerate(rows) if step < len(g)]))
    return sampler


@pytest.mark.parametrize("seed", range(4))
def test_distribution_matches_transformers_processors(seed):
    torch.manual_seed(seed)
    logits = torch.randn(len(ROWS), V) * 3  # about half negative: the penalties must treat both signs right
    sampler = sampler_with(ROWS)
    rows = [6, 0, 8, 3, 1, 5, 7, 2, 4]  # not in slot order: settings are looked up per row
    ours = our_distribution(sampler, logits[rows], rows)
    for i, r in enumerate(rows):
        settings, prompt, generated = ROWS[r]
        params = SamplingParams(**settings).resolved(True)
        expected = reference_distribution(logits[r], params, list(prompt), generated)
        assert torch.equal(ours[i] > 0, expected > 0), (r, (ours[i] > 0).nonzero().flatten(),
                                                        (expected > 0).nonzero().flatten())
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=1e-6, msg=f"row {r}")


def test_ties_at_the_top_p_edge():
    """Tied logits put the mass before a candidate exactly on top_p (0.25 per token, top_p 0.5): that candidate is
    dropped (the kept set is the smallest that reaches top_p), as transformers drops it."""
    for top_p, kept in [(0.5, 2), (0.75, 3), (0.625, 3), (1.0, 4)]:
        logits = torch.full((V,), -1e4)
        logits[[7, 19, 23, 42]] = 2.5  # four tied best tokens, 0.25 each; the rest have no mass
        params = SamplingParams(temperature=1.0, top_p=top_p, top_k=0, min_p=0.0)
        sampler = Sampler(1, V, "cpu")
        sampler.set_row(0, params, [])
        ours = our_distribution(sampler, logits[None], [0])[0]
        expected = reference_distribution(logits, params, [], [])
        assert (ours > 0).sum() == (expected > 0).sum() == kept, top_p
        # which of the tied tokens stay is the sort's choice (in both): the kept ones are among the tied, same mass
        assert set((ours > 0).nonzero().flatten().tolist()) <= {7, 19, 23, 42}
        assert torch.equal(ours.sort().values, expected.sort().values)


def test_sampled_tokens_follow_the_reference_distribution():
    """The inverse-CDF draw: 4,000 seeded rows with the same settings and history sample the reference distribution
    (each frequency within 4 standard errors)."""
    n, settings, prompt, generated = 4000, *ROWS[3]
    sampler = sampler_with([ROWS[3]] * n)
    torch.manual_seed(11)
    logits = torch.randn(V) * 3
    tokens = sampler.sample(logits.expand(n, V).contiguous(), list(range(n)))
    frequency = torch.bincount(tokens, minlength=V).float() / n
    expected = reference_distribution(logits, SamplingParams(**settings).resolved(True), list(prompt), generated)
    assert frequency[expected == 0].sum() == 0  # never a filtered token
    assert ((frequency - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9).all()


def test_presence_counts_generated_tokens_only_and_repetition_the_prompt_too():
    """Our documented choice, as vLLM: presence_penalty (OpenAI) looks at the output only; repetition_penalty
    (transformers) at the prompt and the output."""
    logits = torch.linspace(-4, 4, V)
    prompt_only, generated_only, both, neither = 10, 50, 20, 30  # logits < 0, > 0, < 0, < 0
    presence = Sampler(1, V, "cpu")
    presence.set_row(0, SamplingParams(presence_penalty=1.0).resolved(True), [prompt_only, both])
    presence.observe([0], [generated_only])
    presence.observe([0], [both])
    penalized = presence._penalize(logits[None], torch.tensor([0]))[0]
    assert penalized[prompt_only] == logits[prompt_only] and penalized[neither] == logits[neither]
    assert penalized[generated_only] == logits[generated_only] - 1.0 and penalized[both] == logits[both] - 1.0
    repetition = Sampler(1, V, "cpu")
    repetition.set_row(0, SamplingParams(repetition_penalty=2.0).resolved(True), [prompt_only, both])
    repetition.observe([0], [generated_only])
    penalized = repetition._penalize(logits[None], torch.tensor([0]))[0]
    assert penalized[prompt_only] == 2 * logits[prompt_only] and penalized[both] == 2 * logits[both]  # negative
    assert penalized[generated_only] == logits[generated_only] / 2 and penalized[neither] == logits[neither]


def test_top_k_keeps_exactly_k_where_the_references_keep_ties():
    """A documented difference: with the k-th best logit tied, transformers (and vLLM) keep every tied token; we keep
    k (which of the tied ones is topk's choice). Real logits tie at the k-th value only by accident."""
    logits = torch.zeros(V)
    logits[[3, 9]] = 5.0
    logits[[11, 12, 13]] = 4.0  # tied third, fourth and fifth
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=3, min_p=0.0)
    sampler = Sampler(1, V, "cpu")
    sampler.set_row(0, params, [])
    ours = our_distribution(sampler, logits[None], [0])[0]
    expected = reference_distribution(logits, params, [], [])
    assert set((expected > 0).nonzero().flatten().tolist()) == {3, 9, 11, 12, 13}
    kept = set((ours > 0).nonzero().flatten().tolist())
    assert len(kept) == 3 and {3, 9} < kept and len(kept & {11, 12, 13}) == 1
