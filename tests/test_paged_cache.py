"""The paged KV cache and prefix caching: the block pool's bookkeeping, greedy generations equal with and without
the prefix cache and paging (dense, MoE, the hybrid; ragged batches; against a full forward of each prompt alone),
eviction and preemption when the pool is too small, memory that follows the tokens in flight, cancellation, the
thinking budget and speculative steps over cached prefixes, stale prefixes forgotten when the weights change."""
import random

import pytest
import torch

from nanoqwen.generation import BUDGET_PHRASE, Engine, SamplingParams, generate_batch, make_request
from nanoqwen.generation.blocks import BlockPool, block_hashes
from nanoqwen.generation.decode import decode_step
from test_engine import GREEDY, QUESTION, full_forward_greedy, random_model, thinker  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `tok` comes from there too

SHARED = list(range(100, 180))  # an 80-token "system prompt": 5 blocks of 16, past the hybrid's 64-token snapshot
KINDS = ["dense", "moe", "hybrid"]


def shared_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n ragged prompts: the shared prefix, then 1-30 tokens of their own."""
    rng = random.Random(seed)
    return [SHARED + [rng.randrange(200, 500) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def run(model, tok, prompts, new_tokens=10, **engine_options):
    """Token ids of greedy generations through one engine, and the engine."""
    options = dict(batch_size=len(prompts), max_len=128) | engine_options
    engine = Engine(model, tok, **options)
    requests = [make_request(model, tok, p, SamplingParams(max_new_tokens=new_tokens, **GREEDY), index=i)
                for i, p in enumerate(prompts)]
    results = {c.index: c.result.token_ids for c in engine.run(requests) if c.result}
    return [results[i] for i in range(len(prompts))], engine


# ----------------------------------------------------------------------------------------------------------------
# The block pool

def test_block_hashes_name_the_whole_prefix():
    a, b = block_hashes(list(range(40)), 16), block_hashes(list(range(32)) + [7] * 8, 16)
    assert len(a) == 2 and a == b  # the third block is not full: no hash
    c = block_hashes([99] + list(range(1, 40)), 16)
    assert c[0] != a[0] and c[1] != a[1]  # an earlier token changes every later hash
    assert block_hashes(list(range(16, 32)), 16)[0] != a[1]  # the same tokens after another prefix


def test_pool_counts_users_evicts_the_least_recently_used_and_grows():
    pool = BlockPool(num_blocks=8, capacity=4)
    first = pool.allocate(3)
    assert first == [1, 2, 3] and pool.available() == 4  # 0 is the null block; 4 more can be grown
    pool.register(1, b"a")
    pool.register(2, b"b")
    pool.take([1])
    pool.release(first)  # 1 keeps a user; 2 is cached and unused (LRU); 3 was never cached: free
    assert pool.match([b"a", b"b", b"x"]) == [1, 2] and pool.refs[1] == 1 and pool.used == 1
    more = pool.allocate(3)  # free blocks first, then the oldest cached one (its hash forgotten), then growth
    assert more == [3, 2, 4] and pool.capacity == 5 and pool.evicted == 1 and pool.match([b"a", b"b"]) == [1]
    assert pool.allocate(4) is None and pool.available() == 3 and pool.peak_used == 4
    pool.release(more)
    pool.forget()
    assert pool.match([b"a"]) == [] and pool.available() == 6


def test_bad_cache_sizes_are_rejected(tok):
    model = random_model()
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, tok, block_size=12)
    engine = Engine(model, tok, batch_size=2, max_len=128, num_blocks=5)
    request = make_request(model, tok, list(range(60)), SamplingParams(max_new_tokens=20, **GREEDY))
    with pytest.raises(ValueError, match="exceed the cache"):  # 80 tokens but 4 blocks of 16
        engine.admissible([request])


# ----------------------------------------------------------------------------------------------------------------
# The same tokens with and without the prefix cache and paging

@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_with_and_without_prefix_cache_and_paging(tok, kind):
    """Ragged prompts sharing an 80-token prefix, two calls on one engine (the second finds the first's blocks):
    the tokens of a full forward of each prompt alone, with the prefix cache, without it, and without paging (one
    block per row). The cache must really be used: blocks found, tokens not prefilled again."""
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    prompts = shared_prompts(6)
    expected = [full_forward_greedy(model, p, 10) for p in prompts]
    engine, got = Engine(model, tok, batch_size=3, max_len=128), []
    for half in (prompts[:3], prompts[3:]):
        got += [r.token_ids for r in generate_batch(model, tok, half, max_new_tokens=10, engine=engine, **GREEDY)]
    assert got == expected
    shared_blocks = 4 if kind == "hybrid" else 5  # the hybrid resumes from its 64-token DeltaNet snapshot
    assert engine.cache.pool.hit == shared_blocks * 5  # every prompt but the first found the prefix
    for options in (dict(enable_prefix_caching=False), dict(block_size=128)):  # no cache; one block per row
        tokens, other = run(model, tok, prompts, **options)
        assert tokens == expected and other.cache.pool.hit == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_sharing_an_uncached_prefix_computes_it_once(tok, kind):
    """Requests that arrive together and share a prefix nobody cached yet: the first computes it, the others take
    its blocks (two waves of prefill), and all get the tokens of a full forward."""
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    prompts = shared_prompts(4, seed=1)
    tokens, engine = run(model, tok, prompts)
    assert tokens == [full_forward_greedy(model, p, 10) for p in prompts]
    assert engine.cache.pool.hit == (4 if kind == "hybrid" else 5) * 3


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_static_step_over_block_tables(tok, static):
    """The CUDA-graph layout (every row, the whole block table, static buffers), run eagerly, with cached
    prefixes and rows joining a running batch."""
    model = random_model()
    prompts = shared_prompts(5, seed=2)
    engine = Engine(model, tok, batch_size=2, max_len=128, compile=static)
    engine.decoder.step = decode_step  # no compiler in the tests: the layout is what is checked
    tokens = [r.token_ids for r in generate_batch(model, tok, prompts, max_new_tokens=10, engine=engine, **GREEDY)]
    assert tokens == [full_forward_greedy(model, p, 10) for p in prompts]
    assert engine.cache.pool.hit > 0 and (engine.cache.pool.capacity == engine.cache.pool.num_blocks) == static


def test_decode_step_over_block_tables_traces_as_one_graph(tok):
    model = random_model()
    engine = Engine(model, tok, batch_size=2, max_len=64, compile=True)
    engine.decoder.step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    result = generate_batch(model, tok, [[1, 2, 3], list(range(5, 25))], max_new_tokens=8, engine=engine, **GREEDY)
    assert [r.token_ids for r in result] == [full_forward_greedy(model, p, 8) for p in ([1, 2, 3], range(5, 25))]


# ----------------------------------------------------------------------------------------------------------------
# Memory

@pytest.mark.parametrize("kind", KINDS)
def test_eviction_and_preemption_when_the_pool_is_small(tok, kind):
    """A pool of 12 blocks (176 tokens) for 8 rows of up to ~90 tokens with 8 different prefixes: rows wait for
    blocks, running rows are preempted (and come back through their cached blocks), unused cached prefixes are
    evicted; every answer is still the full forward's, and no more than 12 blocks were ever allocated."""
    model = random_model(kind == "moe", hybrid=kind == "hybrid")
    rng = random.Random(3)
    prompts = [[rng.randrange(200, 500) for _ in range(rng.randint(40, 70))] for _ in range(8)]
    tokens, engine = run(model, tok, prompts, new_tokens=20, batch_size=4, num_blocks=12)
    assert tokens == [full_forward_greedy(model, p, 20) for p in prompts]
    pool = engine.cache.pool
    assert engine.preemptions > 0 and pool.evicted > 0 and pool.capacity == 12


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_preempted_rows_keep_their_seeded_sampling_and_penalties(tok, static):
    """A preempted row keeps its random generator and penalty history (a static step, which decodes every row,
    must not count the token it computes for a row set aside): seeded sampling with penalties gives the tokens it
    gives in a pool large enough that nothing is preempted."""
    model = random_model()
    rng = random.Random(4)
    prompts = [[rng.randrange(200, 500) for _ in range(rng.randint(30, 60))] for _ in range(6)]
    knobs = dict(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3,
                 presence_penalty=0.5, seed=5)
    out = []
    for num_blocks in (None, 10):
        engine = Engine(model, tok, batch_size=4, max_len=128, num_blocks=num_blocks, compile=static)
        engine.decoder.step = decode_step  # no compiler in the tests: the layout is what is checked
        out.append([r.token_ids for r in generate_batch(model, tok, prompts, engine=engine, **knobs)])
        assert (engine.preemptions > 0) == (num_blocks == 10)
    assert out[0] == out[1]


def test_memory_follows_the_tokens_in_flight(tok):
    """An eager pool grows with the blocks in use: 8 short rows in a 512-token engine take a few blocks, not
    8 x 512 tokens of them."""
    model = random_model()
    tokens, engine = run(model, tok, [[i, i + 1, i + 2] for i in range(8)], new_tokens=10, batch_size=8, max_len=512)
    cache = engine.cache
    assert cache.pool.peak_used == 8  # one block each
    assert cache.allocated_bytes == 16 * cache.block_bytes  # static slots: 8 x 512 tokens, 256 blocks' worth


# ----------------------------------------------------------------------------------------------------------------
# With the rest of the engine

def test_cancelled_rows_give_their_blocks_back(tok):
    model = random_model()
    engine = Engine(model, tok, batch_size=2, max_len=128)
    stream = generate_batch(model, tok, shared_prompts(2), max_new_tokens=40, engine=engine, stream=True, **GREEDY)
    next(stream)
    stream.close()
    assert engine.free_slots() == [0, 1] and engine.cache.pool.used == 0
    again = generate_batch(model, tok, shared_prompts(2), max_new_tokens=5, engine=engine, **GREEDY)
    assert [r.token_ids for r in again] == [full_forward_greedy(model, p, 5) for p in shared_prompts(2)]


def test_thinking_budget_and_speculative_steps_over_a_cached_prefix(tok, thinker):
    """A long system prompt shared by every request (cached after the first), the thinking budget's forced phrase
    and speculative steps: the tokens of plain decoding without the cache."""
    thinking, word, answer = thinker
    system = [{"role": "system", "content": "You are terse. " * 40}]
    prompts = [tok.apply_chat_template(system + QUESTION, add_generation_prompt=True)] * 3
    results = {}
    for options in (dict(), dict(enable_prefix_caching=False), dict(speculative="ngram")):
        engine = Engine(thinking, tok, batch_size=2, max_len=512, **options)
        results[str(options)] = [r.token_ids for r in generate_batch(thinking, tok, prompts, engine=engine,
                                                                     max_new_tokens=60, thinking_budget=3)]
        assert (engine.cache.pool.hit > 0) == options.get("enable_prefix_caching", True)
    assert len(set(map(str, results.values()))) == 1
    phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
    assert results["{}"][0] == [tok.think_start_id] + [word] * 3 + phrase + [answer, tok.eos_token_id]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_finished_answer_is_reused_up_to_its_last_written_key(tok, kind):
    """The next turn of a chat starts with the previous prompt and answer. The answer's last token was chosen but
    never read by the model (its key is not written), here exactly where a block ends: that block must not be
    cached, the ones before it must be."""
    model = random_model(kind == "moe")
    prompt = list(range(100, 150))  # 50 tokens + 14 generated = 64: the answer ends a block
    engine = Engine(model, tok, batch_size=1, max_len=128)
    answer = generate_batch(model, tok, [prompt], max_new_tokens=14, engine=engine, **GREEDY)[0].token_ids
    follow_up = prompt + answer + [7, 8, 9]
    again = generate_batch(model, tok, [follow_up], max_new_tokens=10, engine=engine, **GREEDY)[0].token_ids
    assert again == full_forward_greedy(model, follow_up, 10)
    assert engine.cache.pool.hit == 3  # blocks 0-2; block 3 holds the unread last token


def test_prefix_cache_is_forgotten_when_the_weights_change(tok):
    """Between two calls on one engine (RL: rollouts, then a training step), cached keys of the old weights must
    not be reused."""
    model = random_model()
    prompts = shared_prompts(2)
    engine = Engine(model, tok, batch_size=2, max_len=128)
    generate_batch(model, tok, prompts, max_new_tokens=5, engine=engine, **GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    again = generate_batch(model, tok, prompts, max_new_tokens=5, engine=engine, **GREEDY)
    assert [r.token_ids for r in again] == [full_forward_greedy(model, p, 5) for p in prompts]
