"""Dual Chunk Attention: plain attention while a sequence fits in a chunk; a layer against a direct evaluation of
the definition (an explicit per-pair relative-position matrix, one softmax); full prefill == chunked prefill ==
token-by-token decode over the paged KV cache (dense, MoE, hybrid); the engine's greedy tokens against full
forwards; the config read, written and checked; the CLI switch; the long-context evaluation's table."""
import json
import math

import pytest
import torch

from nanoqwen.config import Qwen3Config, long_context, with_overrides
from nanoqwen.generation.cache import paged_view
from nanoqwen.generation.cache_manager import PagedCache
from test_engine import full_forward_greedy, random_model
from test_paged_cache import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `tok` comes from there too

KINDS = ["dense", "moe", "hybrid"]


def dca(chunk_size, local_size, original=None):
    d = {"chunk_size": chunk_size, "local_size": local_size}
    return d | ({"original_max_position_embeddings": original} if original is not None else {})


def model_pair(kind, config):
    """A random tiny model, and the same weights with dual_chunk_attention_config set."""
    plain = random_model(moe=kind == "moe", hybrid=kind == "hybrid")
    chunked = type(plain)(with_overrides(plain.config, dual_chunk_attention_config=config))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_plain_attention_while_the_sequence_fits_in_a_chunk(kind):
    plain, chunked = model_pair(kind, dca(32, 8, original=64))
    ids = torch.randint(0, 512, (2, 32))  # up to chunk_size every pair keeps its true distance
    with torch.no_grad():
        torch.testing.assert_close(chunked(ids).logits, plain(ids).logits, atol=2e-5, rtol=0)
        longer = torch.randint(0, 512, (2, 60))  # past it the distances are capped: the logits move
        assert (chunked(longer).logits - plain(longer).logits).abs().max() > 1e-2


def _rotate(x: torch.Tensor, distance: int, theta: float) -> torch.Tensor:
    """RoPE by `distance` positions (rotate-half pairs (i, i + D/2), frequencies theta^(-2i/D)), in fp64."""
    D = x.shape[-1]
    angle = distance / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    x1, x2 = x[: D // 2], x[D // 2:]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()))


def direct_dual_chunk_layer(attn, x, chunk_size, local_size, original, theta):
    """One attention layer from the definition: per pair (i, j) the query's position in its part minus the key's
    position in its chunk, every score written out, one softmax per query over all its keys."""
    T, H, KV, D = x.shape[1], attn.num_heads, attn.num_kv_heads, attn.head_dim
    chunk_len = chunk_size - local_size
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x).view(1, T, H, D))[0].double()
        k = attn.k_norm(attn.k_proj(x).view(1, T, KV, D))[0].double()
        v = attn.v_proj(x).view(T, KV, D).double()
    relative = torch.zeros(T, T, dtype=torch.long)
    for i in range(T):
        for j in range(i + 1):
            if i // chunk_len == j // chunk_len:
                query = i % chunk_len
            elif i // chunk_len == j // chunk_len + 1:
                query = min(i % chunk_len + chunk_len, chunk_size)
            else:
                query = chunk_size
            relative[i, j] = query - j % chunk_len
    assert relative.max() <= chunk_size and relative.min() >= 0
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for i in range(T):
        scale = max(1.0, 0.1 * math.log((i + 1) / original) + 1.0) / math.sqrt(D)
        for h in range(H):
            g = h // (H // KV)
            # <R(a) q, R(b) k> = <R(a - b) q, k>: only the pair's relative distance matters
            scores = torch.stack([_rotate(q[i, h], int(relative[i, j]), theta) @ k[j, g] for j in range(i + 1)])
            out[i, h] = torch.softmax(scores * scale, 0) @ v[: i + 1, g]
    with torch.no_grad():
        return attn.o_proj(out.reshape(1, T, H * D).float())


def test_a_layer_agrees_with_the_definition(monkeypatch):
    chunk_size, local_size, original = 8, 3, 8  # chunks of 5 tokens; the logit scale grows past 8 tokens
    _, model = model_pair("dense", dca(chunk_size, local_size, original))
    attn, T = model.model.layers[0].self_attn, 27
    x = torch.randn(1, T, model.config.hidden_size)
    positions = torch.arange(T)[None]
    rope = model.dual_chunk_rope(positions, torch.float32)
    with torch.no_grad():
        got = attn(x, rope.key_cos, rope.key_sin, dual_chunk=rope)
    want = direct_dual_chunk_layer(attn, x, chunk_size, local_size, original, model.config.rope_theta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    monkeypatch.setattr("nanoqwen.model.MAX_SCORES", 100)  # queries in blocks of 1 (a long prefill's memory bound)
    with torch.no_grad():
        blocked = attn(x, rope.key_cos, rope.key_sin, dual_chunk=model.dual_chunk_rope(positions, torch.float32))
    torch.testing.assert_close(blocked, want, atol=2e-5, rtol=1e-4)


def cached_logits(model, ids: list[int], piece: int, block_size: int = 4) -> torch.Tensor:
    """Logits of every position, the sequence fed `piece` tokens at a time through a paged KV cache."""
    cache = PagedCache(model, 1, len(ids), block_size)
    cache.admit(0, ids)
    row, logits = torch.tensor([0]), []
    table = cache.table[row, :-(-len(ids) // block_size)]
    with torch.no_grad():
        for c0 in range(0, len(ids), piece):
            positions = torch.arange(c0, min(c0 + piece, len(ids)))[None]
            view = paged_view(cache.layers, table, positions, block_size, rows=row)
            logits.append(model(torch.tensor([ids[c0:c0 + piece]]), position_ids=positions, cache=view).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_chunked_prefill_and_decode_agree(kind):
    _, model = model_pair(kind, dca(16, 4, original=16))  # chunks of 12: 70 tokens cross five of them
    ids = torch.randint(0, 512, (70,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits
    for piece in (70, 9, 1):  # one cached prefill, pieces across chunk and block boundaries, token by token
        torch.testing.assert_close(cached_logits(model, ids, piece), full, atol=5e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_engine_greedy_tokens_equal_full_forwards(tok, kind):
    _, model = model_pair(kind, dca(16, 4, original=16))
    prompts = [torch.randint(200, 500, (n,)).tolist() for n in (23, 37)]
    got, _ = run(model, tok, prompts, new_tokens=24)  # ragged batch, paged cache, prefix caching, decode steps
    assert got == [full_forward_greedy(model, p, 24) for p in prompts]


@pytest.mark.parametrize("config, problem", [
    (dca(16, 16), "local_size = 16: must be an integer in 0..chunk_size-1"),
    (dca(16, -1), "local_size = -1"),
    (dca(512, 8), "chunk_size = 512 is larger than the trained length (256)"),
    (dca(64, 8, original=32), "chunk_size = 64 is larger than the trained length (32)"),
    ({"chunk_size": "8k"}, "chunk_size = '8k': must be an integer >= 2"),
    (dca(16, 4, original=0), "original_max_position_embeddings = 0"),
])
def test_bad_dual_chunk_configs_end_in_one_clear_error(config, problem):
    base = random_model().config.to_dict()
    with pytest.raises(ValueError) as error:
        Qwen3Config.from_dict(base | {"dual_chunk_attention_config": config})
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_config_round_trip_and_long_context_overrides(tmp_path):
    config = random_model().config
    assert "dual_chunk_attention_config" not in config.to_dict()  # written only when set
    with_dca = with_overrides(config, **long_context(config, dual_chunk=64, yarn=2.0))
    assert with_dca.dual_chunk_attention_config == {"chunk_size": 64, "local_size": 2,
                                                    "original_max_position_embeddings": 256}
    assert with_dca.rope_scaling["original_max_position_embeddings"] == 256 and with_dca.trained_length == 256
    assert with_dca.max_position_embeddings == 512  # the trained length times the YaRN factor
    with_dca.save(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["dual_chunk_attention_config"]["chunk_size"] == 64
    assert Qwen3Config.from_json(str(tmp_path)) == with_dca
    assert with_overrides(config, **long_context(config, dual_chunk=128)).max_position_embeddings == 1024  # 4x


def test_cli_dca_flag(tiny, capsys):
    from nanoqwen.cli import main
    main(["generate", "--model", tiny, "--prompt", "a b c", "--raw", "--max-new-tokens", "3", "--temperature", "0",
          "--dca", "1024", "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 3
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny, "--prompt", "x", "--dca", "8192", "--device", "cpu"])
    assert "chunk_size = 8192 is larger than the trained length (4096)" in capsys.readouterr().err


def test_long_context_sweep_table_and_plot(tiny, tmp_path):
    from nanoqwen.train.evaluate import EvalOptions, run as run_eval
    report = run_eval(EvalOptions(model=tiny, out=str(tmp_path), suite="long-context", lengths="64", passkey_length=128,
                                  extensions="all", multiples="1,2", trained_length=128, passkeys=2, device="cpu"))
    sweep = report["context_sweep"]
    assert list(sweep) == ["none", "yarn", "dca", "dca+yarn"] and all(list(row) == [1, 2] for row in sweep.values())
    # within the trained length Dual Chunk Attention (chunks of the trained length) is plain attention; YaRN is not
    assert sweep["dca"][1]["loss"] == pytest.approx(sweep["none"][1]["loss"], abs=1e-5)
    assert sweep["dca+yarn"][1]["loss"] == pytest.approx(sweep["none"][1]["loss"], abs=1e-5)
    assert abs(sweep["yarn"][1]["loss"] - sweep["none"][1]["loss"]) > 1e-4
    assert sweep["dca"][2]["loss"] != pytest.approx(sweep["none"][2]["loss"], abs=1e-4)
    assert all(0 <= cell["passkey"] <= 1 and cell["loss"] > 0 for row in sweep.values() for cell in row.values())
    assert (tmp_path / "long_context.png").stat().st_size > 1000
    assert json.load(open(tmp_path / "eval.json"))["trained_length"] == 128
