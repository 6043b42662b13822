"""The Qwen3-Next hybrid against transformers' Qwen3NextForCausalLM (an independent implementation, run here on its
pure-PyTorch fallbacks of the gated delta rule and the causal conv): logits both ways, padding, loss and gradients,
the delta-rule kernels themselves, cached decoding, packed documents, configs and counts, training. The engine
(greedy generation against transformers', continuous batching) runs the hybrid in tests/test_engine.py."""
import json
import os

import pytest
import torch
import transformers
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from nanoqwen.checkpoint import load_model, model_class, save_model
from nanoqwen.config import Qwen3Config, get_preset
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.generation.cache_manager import PagedCache
from nanoqwen import qwen3_next
from nanoqwen.qwen3_next import gated_delta_rule
from nanoqwen.train.trainer import TrainConfig, Trainer
from test_model import cached_forward, max_diff, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = 1e-4
VARIANTS = {
    "moe": dict(),
    "dense": dict(num_experts=0),
    "mlp_only_layers": dict(mlp_only_layers=[0, 3]),
    "one_value_head_per_key_head": dict(linear_num_value_heads=2),
    "every_other_layer_full": dict(layer_types=["linear_attention", "full_attention"] * 2),
}


def hf_config(**overrides):
    cfg = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=24, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, shared_expert_intermediate_size=48, max_position_embeddings=512,
               initializer_range=0.1)
    cfg.update(overrides)
    return transformers.Qwen3NextConfig(**cfg)


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturbed(transformers.Qwen3NextForCausalLM(hf_config(**overrides)).eval())


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_match_transformers_both_directions(tmp_path, overrides):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf")).eval()
    assert type(ours).__name__ == "Qwen3NextForCausalLM" and ours.config.layer_types == hf.config.layer_types
    ids = torch.randint(0, 160, (2, 150))  # 150 tokens: two full chunks of 64 and a partial one
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < TOL
    save_model(ours, str(tmp_path / "ours"))
    back = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(back(ids).logits, hf(ids).logits) < TOL


def test_padding_mask_matches_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path)).eval()
    ids = torch.randint(0, 160, (3, 90))
    mask = torch.ones(3, 90, dtype=torch.long)
    mask[0, :37], mask[2, :80] = 0, 0  # left padding: must never reach the DeltaNet state
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert max_diff(got[real], expected[real]) < TOL


def test_loss_and_gradients_match_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, 160, (2, 80))
    labels = ids.clone()
    labels[0, :10] = -100
    hf.train(), ours.train()
    hf_out = hf(ids, labels=labels, output_router_logits=True)
    ours_out = ours(ids, labels=labels, output_router_logits=True)
    assert abs(hf_out.loss.item() - ours_out.loss.item()) < 1e-5
    assert abs(hf_out.aux_loss.item() - ours_out.aux_loss.item()) < 1e-5
    hf_out.loss.backward()
    ours_out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if name in hf_grads and hf_grads[name].grad is not None:  # experts are stacked differently in each
            assert max_diff(p.grad, hf_grads[name].grad) < 1e-5, name
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("T", [1, 7, 64, 130])
def test_gated_delta_rule_equals_transformers_chunked_and_recurrent(T):
    torch.manual_seed(T)
    B, Hk, H, Dk, Dv = 2, 2, 4, 16, 8
    q, k = torch.randn(B, T, Hk, Dk), torch.randn(B, T, Hk, Dk)
    v = torch.randn(B, T, H, Dv)
    g = -torch.rand(B, T, H) * 2  # log decays
    beta = torch.rand(B, T, H)
    start = torch.randn(B, H, Dk, Dv)
    ours, our_end, _ = gated_delta_rule(q, k, v, g, beta, start)
    for reference in (hf_next.torch_chunk_gated_delta_rule, hf_next.torch_recurrent_gated_delta_rule):
        expected, end = reference(q, k, v, g=g, beta=beta, initial_state=start, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
        assert max_diff(ours, expected) < 1e-4, reference.__name__
        assert max_diff(our_end, end) < 1e-4, reference.__name__


def test_gated_delta_rule_stays_fp32_under_autocast():
    """Training on a GPU runs under bf16 autocast: the delta rule's matmuls and solve must not be rounded by it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 4, 8)
    g, beta = -torch.rand(1, 100, 4), torch.rand(1, 100, 4)
    expected = gated_delta_rule(q, k, v, g, beta)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gated_delta_rule(q, k, v, g, beta)[0], expected)


def test_cached_decoding_equals_full_forward(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).eval()
    ids = torch.randint(0, 160, (2, 150))
    with torch.no_grad():
        full = model(ids).logits
        cache = PagedCache(model, rows=2, max_len=160)
        logits = [cached_forward(model, cache, ids[:, :70], 0).logits]  # prefill, then one by one
        for t in range(70, 150):
            logits.append(cached_forward(model, cache, ids[:, t:t + 1], t).logits)
    assert max_diff(torch.cat(logits, 1), full) < TOL


def test_packed_documents_restart_the_state():
    """A row packing three documents gives each one exactly what it gives alone (attention and DeltaNet state both
    start over, the conv never reaches across), and so do the gradients."""
    torch.manual_seed(0)
    model = model_class(get_preset("nano-next-d4", vocab_size=160))(get_preset("nano-next-d4", vocab_size=160))
    model.init_weights()
    ids = torch.randint(0, 160, (1, 150))
    documents = torch.tensor([[0] * 40 + [1] * 75 + [2] * 35])
    packed = model(ids, document_ids=documents).logits
    alone = torch.cat([model(ids[:, :40]).logits, model(ids[:, 40:115]).logits, model(ids[:, 115:]).logits], 1)
    assert max_diff(packed, alone) < TOL
    (packed[0, 60] - packed[0, 50]).square().sum().backward()
    conv = model.model.layers[0].linear_attn.conv1d.weight
    grad = conv.grad.clone()
    model.zero_grad()
    alone = model(ids[:, 40:115]).logits
    (alone[0, 20] - alone[0, 10]).square().sum().backward()
    assert max_diff(conv.grad, grad) < 1e-4 * grad.abs().max().item()  # fp32 sums in another order


def test_released_preset_counts_and_config_round_trip(tmp_path):
    raw = json.load(open(os.path.join(os.path.dirname(__file__), "data", "qwen3_official_configs.json")))
    official = raw["Qwen3-Next-80B-A3B"]
    cfg = Qwen3Config.from_dict(official)
    assert cfg == get_preset("Qwen3-Next-80B-A3B")
    assert cfg.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"] and cfg.rotary_dim == 64
    assert Qwen3Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with torch.device("meta"):
        ours = model_class(cfg)(cfg)
        ref = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**cfg.to_dict()))
    count = sum(p.numel() for p in ours.parameters())
    assert count == cfg.num_parameters() == sum(p.numel() for p in ref.parameters()) == 79_674_391_296
    assert round(cfg.num_parameters(active_only=True) / 1e9, 2) == 3.87  # "79.67B / 3.87B (without MTP)"
    # transformers v5 keeps theta and the rotary share in rope_parameters
    v5 = Qwen3Config.from_dict({"model_type": "qwen3_next", "rope_parameters": {"rope_theta": 1e7,
                                                                               "partial_rotary_factor": 0.5}})
    assert v5.rope_theta == 1e7 and v5.partial_rotary_factor == 0.5 and v5.num_experts == 512
    with pytest.raises(ValueError, match="Qwen3NextForCausalLM"):
        Qwen3ForCausalLM(cfg)


def test_multi_token_prediction_weights_are_skipped(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(64, 128)  # released checkpoints carry the MTP head
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(str(tmp_path))
    assert not any(name.startswith("mtp") for name in ours.state_dict())


def test_trains_with_packed_documents_and_decays_its_norms(tmp_path):
    torch.manual_seed(0)
    model = load_model("nano-next-d4", vocab_size=64)
    batches = []
    for _ in range(30):
        ids = torch.randint(0, 64, (2, 96))
        ids[:, 1::2] = ids[:, ::2]  # each token repeated once: learnable through the conv
        batches.append(dict(input_ids=ids, labels=ids, document_ids=torch.arange(96).div(32, rounding_mode="floor")
                            .expand(2, -1)))
    trainer = Trainer(model, TrainConfig(steps=30, lr=3e-3, warmup_steps=3, out_dir=str(tmp_path), log_every=100),
                      iter(batches))
    decayed = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    assert id(model.model.norm.weight) in decayed  # zero-centred norms decay (towards a gain of 1)
    assert id(model.model.layers[0].linear_attn.norm.weight) not in decayed
    losses = [trainer.train_step()["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


@pytest.mark.skipif(qwen3_next.FLA_DELTA_RULE is None or not torch.cuda.is_available(),
                    reason="needs CUDA and flash-linear-attention (pip install nanoqwen[gpu])")
def test_kernel_delta_rule_equals_the_pytorch_path_on_gpu(monkeypatch):
    """flash-linear-attention's chunked and fused-recurrent kernels (and causal-conv1d when installed) against the
    PyTorch path, the reference: a whole model's logits, cached decoding, packed documents and gradients."""
    torch.manual_seed(0)
    model = load_model("nano-next-d4", vocab_size=160, device="cuda").eval()
    ids = torch.randint(0, 160, (2, 150), device="cuda")
    docs = torch.arange(150, device="cuda").div(50, rounding_mode="floor").expand(2, -1)

    def run():
        model.zero_grad()
        logits = model(ids).logits
        loss = model(ids, labels=ids, document_ids=docs).loss
        loss.backward()
        cache = PagedCache(model, rows=2, max_len=160)
        with torch.no_grad():
            decoded = [cached_forward(model, cache, ids[:, :100], 0).logits[:, -1]]
            decoded += [cached_forward(model, cache, ids[:, t:t + 1], t).logits[:, -1] for t in range(100, 110)]
        return logits.detach(), loss.detach(), model.model.layers[0].linear_attn.in_proj_qkvz.weight.grad.clone(), \
            torch.stack(decoded)
    kernels = run()
    monkeypatch.setattr(qwen3_next, "FLA_DELTA_RULE", None)
    monkeypatch.setattr(qwen3_next, "CAUSAL_CONV1D", None)
    reference = run()
    for got, expected in zip(kernels, reference):
        assert max_diff(got, expected) < 2e-3 * max(1.0, expected.abs().max().item())
