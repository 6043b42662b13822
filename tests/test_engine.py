"""The generation engine: cache correctness, batching, sampling, thinking budget, stops, streaming, and greedy
generations against transformers' own `generate` on the same random checkpoints."""
import io
import os
import random
import sys

import pytest
import torch
import transformers

from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.config import Qwen3Config
from nanoqwen.checkpoint import load
from nanoqwen.generation import BUDGET_PHRASE, Engine, SamplingParams, generate, generate_batch, make_request
from nanoqwen.generation.decode import decode_step
from nanoqwen.generation.speculative import PromptLookup
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.qwen3_next import Qwen3NextForCausalLM
from nanoqwen.tokenizer import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GREEDY = dict(temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `tok` comes from there too


def tiny_config(moe=False, vocab_size=512, hybrid=False, **overrides):
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=False, initializer_range=0.1)
    if moe:
        cfg.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   norm_topk_prob=True)
    if hybrid:  # Qwen3-Next: DeltaNet, DeltaNet, attention, MoE with a shared expert everywhere
        cfg.update(model_type="qwen3_next", num_hidden_layers=3, full_attention_interval=3, partial_rotary_factor=0.5,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                   norm_topk_prob=True)
    cfg.update(overrides)
    return Qwen3Config(**cfg)


def random_model(moe=False, seed=0, hybrid=False, **overrides):
    """A random tiny model with clear logit margins (so greedy choices never hinge on rounding)."""
    torch.manual_seed(seed)
    model = (Qwen3NextForCausalLM if hybrid else Qwen3ForCausalLM)(tiny_config(moe, hybrid=hybrid, **overrides))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def scripted_model(script: dict[int, int], vocab_size: int = 151936, default: int | None = None):
    """A Qwen3 whose next token depends only on the last one: script[last] = next, else `default` (by a wide margin,
    so any sampling setting picks it). Every block is the identity: attention and MLP outputs are zero."""
    hidden = 32
    assert len(script) < hidden
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, hidden - 1] = 1.0  # a shared dimension carries the default choice
        if default is not None:
            head[default, hidden - 1] = 10.0
        for j, (last, nxt) in enumerate(script.items()):
            embed[last, j] = 1.0
            head[nxt, j] = 30.0
    return model.eval()


def chain(*tokens) -> dict[int, int]:
    """The script that makes the model emit tokens[1:] after tokens[0]."""
    return dict(zip(tokens[:-1], tokens[1:]))


def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def record_logits(engine):
    """Wrap the engine so every logits row that a token is chosen from is kept, per slot: the prefill's (through the
    sampler) and each decode step's (the step returns the logits of every slot)."""
    seen, sample, decode = {}, engine.sampler.sample, engine.decoder.step

    def recording(logits, slots):
        for slot, row in zip(slots, logits):
            seen.setdefault(slot, []).append(row.clone())
        return sample(logits, slots)

    def decoding(*args):
        logits = decode(*args)
        for slot in engine.live_slots():
            seen.setdefault(slot, []).append(logits[slot].float().clone())
        return logits

    engine.sampler.sample, engine.decoder.step = recording, decoding
    return seen


# ----------------------------------------------------------------------------------------------------------------
# The cache

@pytest.mark.parametrize("kind", ["dense", "moe", "yarn", "hybrid"])
def test_cached_decoding_logits_equal_full_forward(tok, kind):
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}} \
        if kind == "yarn" else {}
    model = random_model(moe=kind == "moe", hybrid=kind == "hybrid", **overrides)
    prompts = [[5, 9, 14, 3, 7, 100, 42], [8, 1]]  # ragged: the second row is left-padded
    engine = Engine(model, tok, batch_size=2, max_len=32)
    seen = record_logits(engine)
    requests = [make_request(model, tok, p, SamplingParams(max_new_tokens=20, **GREEDY), index=i)
                for i, p in enumerate(prompts)]
    results = {c.index: c.result for c in engine.run(requests) if c.result}
    for slot, prompt in enumerate(prompts):
        ids = prompt + results[slot].token_ids
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1]
        assert torch.allclose(torch.stack(seen[slot]), full, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "moe", "hybrid"])
def test_ragged_batch_equals_one_by_one(tok, kind):
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    prompts = [[3, 4, 5], [10, 20, 30, 40, 50, 60, 70, 80], [7], [11, 12]]
    batch = generate_batch(model, tok, prompts, max_new_tokens=12, **GREEDY)
    two_rows = generate_batch(model, tok, prompts, max_new_tokens=12, batch_size=2, **GREEDY)  # the rest queue
    assert [r.token_ids for r in two_rows] == [r.token_ids for r in batch]
    for prompt, result in zip(prompts, batch):
        assert result.token_ids == full_forward_greedy(model, prompt, 12)
        assert result.token_ids == generate(model, tok, prompt, max_new_tokens=12, **GREEDY).token_ids


def test_batch_progress_bar_on_a_terminal_only(tok, monkeypatch):
    model = random_model(False)
    prompts = [[3, 4, 5], [7], [11, 12]]

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stderr in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stderr)
        results = generate_batch(model, tok, prompts, max_new_tokens=5, progress="answers", **GREEDY)
        assert [r.token_ids for r in results] == [full_forward_greedy(model, p, 5) for p in prompts]
        drawn = stderr.getvalue()
        if isinstance(stderr, Terminal):  # one redraw per finished answer, with the generation rate
            assert "answers: 100%" in drawn and "3/3" in drawn and " tok/s]" in drawn
        else:
            assert drawn == ""  # logs and pipes stay clean


@pytest.mark.parametrize("hybrid", [False, True], ids=["qwen3", "hybrid"])
@pytest.mark.parametrize("layout", ["cpu", "cuda_graph"])
def test_continuous_batching_over_blocks(tok, layout, hybrid):
    """More requests than rows, of different lengths, in blocks of 4 tokens: rows cross block boundaries while
    decoding, join a running batch and give their blocks to the next request. The cuda_graph layout decodes every
    row over the whole block table (static shapes), here run eagerly. The hybrid's DeltaNet state of a row starts
    over with each new request, in a fresh batch and when joining a running one."""
    model = random_model(hybrid=hybrid)
    prompts = [[1, 2, 3], list(range(20, 34)), [5, 6], list(range(40, 49)), [9]]
    budgets = [10, 4, 15, 7, 12]
    engine = Engine(model, tok, batch_size=2, max_len=24, compile=layout == "cuda_graph", block_size=4)
    engine.decoder.step = decode_step  # no compiler in the tests: the layout is what is checked
    requests = [make_request(model, tok, p, SamplingParams(max_new_tokens=n, **GREEDY), index=i)
                for i, (p, n) in enumerate(zip(prompts, budgets))]
    results = {c.index: c.result for c in engine.run(requests) if c.result}
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        assert results[i].token_ids == full_forward_greedy(model, prompt, n)
        assert results[i].finish_reason == "length"


def pipelined_and_not(model, tok, prompts, static=False, batch_size=2, max_len=64, **kwargs):
    """Chunks of the same generation with steps pipelined (the CUDA default) and one step at a time."""
    out = []
    for pipeline in (True, False):
        engine = Engine(model, tok, batch_size=batch_size, max_len=max_len, compile=static, pipeline=pipeline)
        engine.decoder.step = decode_step  # no compiler: the step logic is what is checked
        out.append(list(generate_batch(model, tok, prompts, engine=engine, stream=True, **kwargs)))
        assert not engine.live_slots()
    return out


def summary(chunks):
    """Per prompt: the result and the streamed pieces (text, kind, token ids)."""
    by_index = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append((c.text, c.kind, c.token_ids, c.logprobs))
    return {c.index: c.result for c in chunks if c.result}, by_index


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static"])
def test_pipelined_steps_equal_one_at_a_time(tok, thinker, talker, static):
    """Step n+1 queued before step n's tokens are read gives exactly the one-at-a-time results: continuous
    batching, forced budget tokens decided a step ahead, stop tokens and strings, penalties,
    seeded sampling, logprobs."""
    model = random_model()
    prompts = [[1, 2, 3], list(range(20, 34)), [5, 6], list(range(40, 49)), [9]]
    piped, plain = pipelined_and_not(model, tok, prompts, static, max_len=24, max_new_tokens=9, **GREEDY)
    assert summary(piped) == summary(plain)
    results = summary(piped)[0]
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == full_forward_greedy(model, prompt, 9)
    thinking, word, answer = thinker
    question = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    for budget in (0, 2, 5):
        piped, plain = pipelined_and_not(thinking, tok, [question] * 3, static, max_new_tokens=60,
                                         thinking_budget=budget)
        assert summary(piped) == summary(plain)
        phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
        assert summary(piped)[0][2].token_ids == [tok.think_start_id] + [word] * budget + phrase + \
            [answer, tok.eos_token_id]
    talking, _ = talker
    for stop in (None, ", wor", "😀"):
        piped, plain = pipelined_and_not(talking, tok, [[START]] * 3, static, max_new_tokens=50, stop=stop)
        assert summary(piped) == summary(plain)
    knobs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3,
                 presence_penalty=0.5, seed=3)
    piped, plain = pipelined_and_not(model, tok, prompts[:3], static, **knobs)
    assert summary(piped) == summary(plain)
    piped, plain = pipelined_and_not(model, tok, prompts[:3], static, max_new_tokens=6, logprobs=2, **GREEDY)
    assert summary(piped) == summary(plain)
    assert all(len(r.logprobs) == 6 for r in summary(piped)[0].values())


def test_pipelined_engine_runs_no_wasted_step_at_the_length_limit(tok):
    model = random_model()
    engine = Engine(model, tok, batch_size=2, max_len=32, pipeline=True)
    generate_batch(model, tok, [[1, 2, 3], [4, 5]], max_new_tokens=10, engine=engine, **GREEDY)
    assert engine.launches == 9  # the first token comes from the prefill


def test_engine_with_and_without_fused_projections(tok):
    """The stacked q/k/v and gate/up weights (the default) give the same generations as separate projections;
    they are the decode step's own tensors: the model's parameters keep their storage."""
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    expected = [full_forward_greedy(model, p, 10) for p in prompts]
    storage = [p.data_ptr() for p in model.parameters()]
    for fused in (False, True):
        for static in (False, True):
            engine = Engine(model, tok, batch_size=2, max_len=32, compile=static, fuse_projections=fused)
            engine.decoder.step = decode_step
            assert [r.token_ids for r in generate_batch(model, tok, prompts, max_new_tokens=10, engine=engine,
                                                        **GREEDY)] == expected
            assert (engine.decoder.fused is not None) == fused
    assert engine.decoder.fused.qkv[0] is not None and engine.decoder.fused.gate_up[1] is not None
    assert [p.data_ptr() for p in model.parameters()] == storage


def test_two_stage_greedy_equals_argmax():
    from nanoqwen.generation.decode import greedy_tokens
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(3, 151936)
        if trial % 2:
            logits = (logits * 2).round()  # many ties: the first index wins, as argmax
        logits[:, 151700:] += 100.0 * (trial % 3 == 0)  # padded rows never win
        assert torch.equal(greedy_tokens(logits, 151669), logits[:, :151669].argmax(-1))


def test_decode_step_traces_as_one_graph(tok):
    """What CUDA-graph capture needs: no graph break in the decode step (checked with the compiler's eager backend)."""
    model = random_model()
    engine = Engine(model, tok, batch_size=2, max_len=32, compile=True)
    engine.decoder.step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    result = generate(model, tok, [1, 2, 3], max_new_tokens=8, engine=engine, **GREEDY)
    assert result.token_ids == full_forward_greedy(model, [1, 2, 3], 8)


def test_abandoned_stream_frees_its_slot(tok):
    model = random_model()
    engine = Engine(model, tok, batch_size=1, max_len=64)
    stream = generate(model, tok, [1, 2, 3], max_new_tokens=20, engine=engine, stream=True, **GREEDY)
    next(stream)
    stream.close()
    assert engine.free_slots() == [0]
    assert generate(model, tok, [4, 5], max_new_tokens=3, engine=engine, **GREEDY).token_ids == \
        full_forward_greedy(model, [4, 5], 3)


def test_prompt_longer_than_context_is_a_clear_error(tok):
    model = random_model()
    with pytest.raises(ValueError, match="context"):
        generate(model, tok, list(range(300)), max_new_tokens=4)
    result = generate(model, tok, list(range(250)), max_new_tokens=100, **GREEDY)
    assert len(result.token_ids) == 6 and result.finish_reason == "length"  # cut to fit 256 positions
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, tok, [1, 2, 9999], max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------
# Sampling

def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tok):
    model = random_model()
    prompt = [4, 8, 15, 16, 23, 42]
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50)
    a = generate(model, tok, prompt, seed=7, **kwargs).token_ids
    assert generate(model, tok, prompt, seed=7, **kwargs).token_ids == a
    assert generate(model, tok, prompt, seed=8, **kwargs).token_ids != a
    batch = generate_batch(model, tok, [[1, 2, 3, 4, 5, 6, 7, 8, 9], prompt], seed=[1, 7], **kwargs)
    assert batch[1].token_ids == a


def test_sampling_filters_that_leave_one_candidate_are_greedy(tok):
    model = random_model()
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, tok, prompt, max_new_tokens=10, **GREEDY).token_ids
    for knobs in (dict(top_k=1), dict(top_p=1e-6, top_k=0), dict(min_p=1.0, top_k=0)):
        out = generate(model, tok, prompt, max_new_tokens=10, temperature=1.5, seed=0, **knobs).token_ids
        assert out == greedy, knobs


def test_penalties_stop_repetition(tok):
    model = scripted_model(chain(10, 11, 11), default=12)  # greedy: 11 forever; 12 is the runner-up
    assert generate(model, tok, [10], max_new_tokens=4, **GREEDY).token_ids == [11] * 4
    for penalty in (dict(repetition_penalty=1e6), dict(presence_penalty=1e4)):
        out = generate(model, tok, [10], max_new_tokens=4, **penalty, **GREEDY).token_ids
        assert out[:2] == [11, 12] and 11 not in out[1:], penalty


def test_logprobs_of_the_raw_distribution(tok):
    model = random_model()
    prompt = [3, 1, 4, 1, 5]
    chunks = list(generate(model, tok, prompt, max_new_tokens=6, logprobs=3, stream=True, **GREEDY))
    result = chunks[-1].result
    with torch.no_grad():
        full = model(torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    for step, (token, (logprob, top)) in enumerate(zip(result.token_ids, result.logprobs)):
        assert logprob == pytest.approx(full[step, token].item(), abs=1e-4)
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen token is the best one
    assert [e for c in chunks for e in c.logprobs] == result.logprobs
    assert generate(model, tok, prompt, max_new_tokens=2, **GREEDY).logprobs is None


def test_bad_sampling_values_are_rejected(tok):
    model = random_model()
    for knobs in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2), dict(max_new_tokens=0),
                  dict(thinking_budget=-1), dict(repetition_penalty=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            generate(model, tok, [1, 2], **knobs)


def test_defaults_follow_the_thinking_mode(tok):
    model = random_model(vocab_size=151936)
    on = make_request(model, tok, [{"role": "user", "content": "hi"}], SamplingParams()).params
    off = make_request(model, tok, [{"role": "user", "content": "hi"}], SamplingParams(), enable_thinking=False).params
    assert (on.temperature, on.top_p, on.top_k, on.min_p) == (0.6, 0.95, 20, 0.0)
    assert (off.temperature, off.top_p, off.top_k, off.min_p) == (0.7, 0.8, 20, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Thinking budget

def thinker_script(tok) -> tuple[dict, int, int]:
    """After "\\n" it opens a think block and then says " hmm" forever, never closing the block by itself; after
    "\\n\\n" (the end of the budget phrase, or of the empty think block) it answers "Hello" and ends the turn."""
    newline, blank = tok.encode("\n")[0], tok.encode("\n\n")[0]
    word, answer = tok.encode(" hmm")[0], tok.encode("Hello")[0]
    script = {newline: tok.think_start_id, tok.think_start_id: word, word: word, blank: answer,
              answer: tok.eos_token_id}
    return script, word, answer


@pytest.fixture(scope="module")
def thinker(tok):
    script, word, answer = thinker_script(tok)
    return scripted_model(script), word, answer


QUESTION = [{"role": "user", "content": "What is 1+1?"}]


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_budget_forces_the_official_phrase_then_the_answer(tok, thinker, budget):
    model, word, answer = thinker
    result = generate(model, tok, QUESTION, max_new_tokens=60, thinking_budget=budget, seed=0)
    phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
    assert result.token_ids == [tok.think_start_id] + [word] * budget + phrase + [answer, tok.eos_token_id]
    assert result.text == "<think>" + " hmm" * budget + BUDGET_PHRASE + "Hello"
    assert result.content == "Hello" and result.finish_reason == "stop"
    assert result.reasoning_content.endswith("based on the thinking directly now.")
    assert result.reasoning_tokens == 1 + budget + len(phrase) - 1  # the "\n\n" after </think> is answer
    assert result.completion_tokens == len(result.token_ids)


def test_without_budget_thinking_runs_to_the_length_limit(tok, thinker):
    model, word, _ = thinker
    result = generate(model, tok, QUESTION, max_new_tokens=20)
    assert result.token_ids == [tok.think_start_id] + [word] * 19
    assert result.finish_reason == "length" and result.content == "" and result.reasoning_tokens == 20


def test_budget_is_per_row_and_skipped_when_thinking_is_off(tok, thinker):
    model, word, answer = thinker
    thinking = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    no_thinking = tok.apply_chat_template(QUESTION, add_generation_prompt=True, enable_thinking=False)
    prefilled = thinking + [tok.think_start_id]  # a prompt that already opened the block
    results = generate_batch(model, tok, [thinking, no_thinking, prefilled], max_new_tokens=60, thinking_budget=2)
    phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
    assert results[0].token_ids == [tok.think_start_id, word, word] + phrase + [answer, tok.eos_token_id]
    assert results[1].token_ids == [answer, tok.eos_token_id] and results[1].reasoning_tokens == 0
    assert results[2].token_ids == [word, word] + phrase + [answer, tok.eos_token_id]
    assert results[2].content == "Hello" and results[2].reasoning_content.startswith(" hmm hmm")


def test_stream_tells_reasoning_from_answer(tok, thinker):
    model, _, _ = thinker
    chunks = list(generate(model, tok, QUESTION, max_new_tokens=60, thinking_budget=3, stream=True))
    kinds = [c.kind for c in chunks]
    switch = kinds.index("content")
    assert set(kinds[:switch]) == {"reasoning"} and set(kinds[switch:]) == {"content"}
    assert "".join(c.text for c in chunks[:switch]).endswith("</think>")
    assert "".join(c.text for c in chunks[switch:]) == "\n\nHello"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].result.content == "Hello"
    assert [t for c in chunks for t in c.token_ids] == chunks[-1].result.token_ids


# ----------------------------------------------------------------------------------------------------------------
# Stops and streaming text

START = 1000  # the prompt of the talker


@pytest.fixture(scope="module")
def talker(tok):
    """Says "Hello, world! 你好😀" after token START, with 你 and 😀 split into their UTF-8 bytes (one token each),
    then ends the turn."""
    def as_bytes(text):
        return [tok.ranks[bytes([b])] for b in text.encode()]
    ids = tok.encode("Hello, world! ") + as_bytes("你") + tok.encode("好") + as_bytes("😀")
    return scripted_model(chain(START, *ids, tok.eos_token_id)), ids


def test_stop_token_ends_generation(tok, talker):
    model, ids = talker
    result = generate(model, tok, [START], max_new_tokens=50)
    assert result.token_ids == ids + [tok.eos_token_id]
    assert result.text == result.content == "Hello, world! 你好😀" and result.finish_reason == "stop"


@pytest.mark.parametrize("stop,expected", [(", wor", "Hello"), (["xyz", "! 你"], "Hello, world"),
                                           ("😀", "Hello, world! 你好"), ("o", "Hell"),
                                           ("not there", "Hello, world! 你好😀")])
def test_stop_strings_cut_the_text_and_streaming_holds_back(tok, talker, stop, expected):
    model, _ = talker
    chunks = list(generate(model, tok, [START], max_new_tokens=50, stop=stop, stream=True))
    result = chunks[-1].result
    assert result.text == expected and result.finish_reason == "stop"
    assert "".join(c.text for c in chunks) == expected


def test_streamed_text_equals_final_text_with_split_utf8(tok, talker):
    model, ids = talker
    chunks = list(generate(model, tok, [START], max_new_tokens=50, stream=True))
    assert all("\ufffd" not in c.text for c in chunks)  # no half characters
    assert "".join(c.text for c in chunks) == chunks[-1].result.text == tok.decode(ids)
    texts = [c.text for c in chunks]
    assert texts[5:13] == ["", "", "你", "好", "", "", "", "😀"]  # a character waits for its last byte


def test_length_limit_mid_character_flushes(tok, talker):
    model, ids = talker
    result = generate(model, tok, [START], max_new_tokens=len(ids) - 2)
    assert result.finish_reason == "length" and result.text.startswith("Hello, world! 你好")


# ----------------------------------------------------------------------------------------------------------------
# Speculative decoding

def oracle_drafts(engine, reference: list[list[int]], seed: int = 0):
    """Make the engine draft the true continuation (from a plain run), cut to a random length (0-4) and, half of
    the time, with one token wrong: every number of kept drafts, per row, comes up."""
    rng = random.Random(seed)

    def draft(slot):
        row = engine.rows[slot]
        future = reference[row.request.index][len(row.token_ids):][:rng.randint(0, 4)]
        if future and rng.random() < 0.5:
            future[rng.randrange(len(future))] += 1
        return future
    engine.draft = draft


@pytest.mark.parametrize("kind", ["dense", "moe", "hybrid"])
def test_speculative_steps_give_the_plain_tokens(tok, kind):
    """Drafts right, wrong and cut short, in a pool so small that rows are preempted mid-way: the tokens are those
    of plain decoding, greedy and seeded sampling with penalties alike. The hybrid's DeltaNet state goes back to
    the last kept token of each row."""
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], list(range(20, 34)), [5, 6], list(range(40, 49)) * 2, [9]]
    for knobs in (GREEDY, dict(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=3)):
        for batch_size, num_blocks in ((2, None), (3, 8)):
            plain = Engine(model, tok, batch_size=batch_size, max_len=64)
            reference = [r.token_ids for r in generate_batch(model, tok, prompts, max_new_tokens=30, engine=plain,
                                                             **knobs)]
            engine = Engine(model, tok, batch_size=batch_size, max_len=64, speculative="ngram",
                            num_speculative_tokens=4, num_blocks=num_blocks)
            oracle_drafts(engine, reference)
            results = generate_batch(model, tok, prompts, max_new_tokens=30, engine=engine, **knobs)
            assert [r.token_ids for r in results] == reference
            assert 0 < engine.accepted < engine.drafted and engine.launches < plain.launches
            assert (engine.preemptions > 0) == (num_blocks is not None)


def speculative_and_not(model, tok, prompts, batch_size=2, max_len=64, **kwargs):
    """Chunks of the same generation with prompt-lookup speculative steps and plain ones."""
    out, engines = [], []
    for speculative in ("ngram", None):
        engines.append(Engine(model, tok, batch_size=batch_size, max_len=max_len, speculative=speculative))
        out.append(list(generate_batch(model, tok, prompts, engine=engines[-1], stream=True, **kwargs)))
    return out, engines[0]


def test_speculative_steps_keep_budget_stops_streams_and_logprobs(tok, thinker, talker):
    """Prompt-lookup drafts against the scripted models (whose answers repeat, so drafts are often right): the
    thinking budget's forced phrase, stop tokens and strings, streamed pieces and logprobs are those of plain
    steps."""
    thinking, word, answer = thinker
    question = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    for budget in (0, 2, 5):
        (spec, plain), engine = speculative_and_not(thinking, tok, [question] * 3, max_new_tokens=60,
                                                    thinking_budget=budget)
        assert summary(spec) == summary(plain)
        assert engine.accepted > 0 or budget < 5  # the repeated thinking word is drafted right
        phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
        assert summary(spec)[0][2].token_ids == [tok.think_start_id] + [word] * budget + phrase + \
            [answer, tok.eos_token_id]
    talking, _ = talker
    for stop in (None, ", wor", "😀"):
        (spec, plain), _ = speculative_and_not(talking, tok, [[START]] * 3, max_new_tokens=50, stop=stop)
        assert summary(spec) == summary(plain)
    model = random_model()
    (spec, plain), engine = speculative_and_not(model, tok, [[1, 2, 3, 1, 2, 3], [7, 8]], max_new_tokens=12,
                                                logprobs=2, **GREEDY)
    spec, plain = summary(spec)[0], summary(plain)[0]
    for i in (0, 1):  # several tokens per forward vs one: the same tokens, logprobs equal up to rounding
        assert spec[i].token_ids == plain[i].token_ids and len(spec[i].logprobs) == 12
        for (a, top_a), (b, top_b) in zip(spec[i].logprobs, plain[i].logprobs):
            assert a == pytest.approx(b, abs=1e-5) and [t for t, _ in top_a] == [t for t, _ in top_b]


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_n=3)
    assert lookup.draft([5], 3) == []
    assert lookup.draft([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # "1 2" occurred before: what followed it
    assert lookup.draft([1, 2, 3, 4, 1, 2, 9, 1, 2], 2) == [9, 1]  # the latest occurrence wins
    assert lookup.draft([1, 2, 3, 4, 1, 2, 9, 1, 2, 3], 5) == [4, 1, 2, 9, 1]  # the longest n-gram (1 2 3) first
    assert lookup.draft([1, 2, 3, 4, 1, 2, 9, 1, 2, 3, 7], 5) == []  # 7 never occurred before
    rng = random.Random(0)
    for _ in range(50):  # against a plain scan of the whole text, as the text grows
        text, lookup = [], PromptLookup(max_n=3)
        for _ in range(20):
            text += [rng.randrange(5) for _ in range(rng.randint(1, 3))]
            expected = next((text[start + n:start + n + 4] for n in range(min(3, len(text) - 1), 0, -1)
                             for start in range(len(text) - n - 1, -1, -1) if text[start:start + n] == text[-n:]), [])
            assert lookup.draft(text, 4) == expected


def test_bad_speculative_settings_are_rejected(tok):
    model = random_model()
    with pytest.raises(ValueError, match="speculative must be 'ngram'"):
        Engine(model, tok, speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        Engine(model, tok, speculative="ngram", num_speculative_tokens=0)


# ----------------------------------------------------------------------------------------------------------------
# Against transformers

@pytest.mark.parametrize("kind", ["dense", "moe", "hybrid"])
def test_greedy_generation_equals_transformers(tok, tmp_path, kind):
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    save_model(model, str(tmp_path))
    cls = {"dense": transformers.Qwen3ForCausalLM, "moe": transformers.Qwen3MoeForCausalLM,
           "hybrid": transformers.Qwen3NextForCausalLM}[kind]
    hf = cls.from_pretrained(tmp_path).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 200], [300, 301, 302, 303]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0,
                               eos_token_id=None)[:, width:].tolist()
        alone = hf.generate(ids[:1], do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    ours = load_model(str(tmp_path))
    results = generate_batch(ours, tok, prompts, max_new_tokens=16, **GREEDY)
    assert [r.token_ids for r in results] == expected
    assert generate(ours, tok, prompts[0], max_new_tokens=16, **GREEDY).token_ids == alone[0, width:].tolist()
    speculative = generate_batch(ours, tok, prompts, max_new_tokens=16, speculative="ngram", **GREEDY)
    assert [r.token_ids for r in speculative] == expected


def test_load_checkpoint_folder_with_and_without_tokenizer(tok, tmp_path):
    model = scripted_model(chain(0, 1, 2))
    save_model(model, str(tmp_path))
    loaded, tokenizer = load(str(tmp_path), device="cpu")
    assert tokenizer.vocab_size == tok.vocab_size  # no tokenizer files, Qwen3's vocabulary: the official one
    assert generate(loaded, tokenizer, [0], max_new_tokens=2, **GREEDY).token_ids == [1, 2]
    small = tmp_path / "small"
    save_model(random_model(vocab_size=512), str(small))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(str(small), device="cpu")
    (small / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="weights"):
        load(str(small), device="cpu")


def test_padded_vocabulary_rows_are_never_sampled():
    """Qwen3's embedding has 151,936 rows for 151,669 tokens: a model that favours a padded row must not emit it."""
    tokenizer = load_tokenizer()
    model = random_model(vocab_size=151936)
    with torch.no_grad():
        model.lm_head.weight[151700:151800] = 50.0 * model.lm_head.weight[:100]  # 50x the logits of ids 0..99
        ids = torch.tensor([tokenizer.encode("hi")])
        assert model(ids).logits[0, -1].argmax() >= tokenizer.vocab_size  # without the guard a padded id would win
    for temperature in (0.0, 1.0):
        result = generate(model, tokenizer, "hi", max_new_tokens=8, temperature=temperature, seed=0)
        assert all(t < tokenizer.vocab_size for t in result.token_ids)


def test_extreme_penalties_stay_finite():
    from nanoqwen.generation.sampling import Sampler
    sampler = Sampler(2, 50, "cpu")
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=5e-324,
                            presence_penalty=2.0, seed=0)
    sampler.set_row(0, params, [1, 2, 3])
    sampler.set_row(1, params, [4])
    tokens = sampler.sample(torch.randn(2, 50) * 10, [0, 1])
    assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < 50)).all()


def test_tiny_top_p_keeps_the_best_token():
    """top_p = 5e-324 rounds to 0 in fp32: the best candidate must still be drawn (the server's fuzzing found this)."""
    from nanoqwen.generation.sampling import Sampler
    sampler = Sampler(1, 50, "cpu")
    sampler.set_row(0, SamplingParams(temperature=1.0, top_p=5e-324, top_k=0, min_p=0.0, seed=0), [1])
    logits = torch.randn(1, 50)
    assert sampler.sample(logits, [0]).item() == logits.argmax().item()


def test_load_takes_a_run_folder(tiny, tmp_path):
    """A training run's folder (a `latest` file naming its newest checkpoint) loads that checkpoint."""
    import shutil
    shutil.copytree(tiny, tmp_path / "step_000002")
    (tmp_path / "latest").write_text("step_000002\n")
    model, tokenizer = load(str(tmp_path), device="cpu")
    reference, _ = load(tiny, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
