"""Qwen3-Next's multi-token-prediction head: loaded and saved under the released names, its forward against a
reference written here from the definition (transformers has no MTP head; its decoder layer is used for the layer),
its loss in training, the router initialisation, and speculative decoding with MTP drafts."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from nanoqwen import data
from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.generation import Engine, generate_batch
from nanoqwen.generation.speculative import capture_hidden
from nanoqwen.model import SparseMoE
from nanoqwen.tokenizer import load_tokenizer
from nanoqwen.train.trainer import TrainConfig, Trainer
from test_engine import GREEDY, random_model
from test_model import max_diff
from test_qwen3_next import hf_config, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def zero_centred_norm(x, weight, eps=1e-6):
    """Qwen3-Next's RMSNorm: x / rms(x) * (1 + weight), in fp32."""
    return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * (1 + weight.float())


def write_checkpoint_with_mtp(path):
    """A transformers Qwen3-Next checkpoint plus a random MTP head under the released names; returns the main
    model, the transformers decoder layer holding the MTP layer's weights (and its rotary embedding) and the
    mtp.* tensors."""
    main = hf_model()
    main.save_pretrained(path)
    torch.manual_seed(1)  # a one-layer full-attention model lends its layer-0 tensors, named as the MTP layer
    donor = transformers.Qwen3NextForCausalLM(hf_config(num_hidden_layers=1, layer_types=["full_attention"])).eval()
    with torch.no_grad():
        for p in donor.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    donor.save_pretrained(path / "donor")
    H = main.config.hidden_size
    mtp = {name.replace("model.layers.0.", "mtp.layers.0."): t
           for name, t in load_file(path / "donor" / "model.safetensors").items() if name.startswith("model.layers.0.")}
    mtp |= {"mtp.pre_fc_norm_embedding.weight": torch.randn(H) * 0.1, "mtp.pre_fc_norm_hidden.weight":
            torch.randn(H) * 0.1, "mtp.fc.weight": torch.randn(H, 2 * H) * 0.05, "mtp.norm.weight": torch.randn(H) * 0.1}
    tensors = load_file(path / "model.safetensors") | mtp
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text()) | {"mtp_num_hidden_layers": 1}
    (path / "config.json").write_text(json.dumps(config))
    return main, donor, mtp


def reference_mtp_logits(main, donor, mtp, ids):
    """The definition: h' = fc(cat(norm_e(embed(x[t+1])), norm_h(h[t]))) -> the layer -> norm -> lm_head, with h
    the main model's final (normed) hidden states; position t's logits predict x[t+2]."""
    with torch.no_grad():
        h = main.model(ids).last_hidden_state[:, :-1]
        e = main.model.embed_tokens(ids[:, 1:])
        x = torch.cat((zero_centred_norm(e, mtp["mtp.pre_fc_norm_embedding.weight"]),
                       zero_centred_norm(h, mtp["mtp.pre_fc_norm_hidden.weight"])), dim=-1) @ mtp["mtp.fc.weight"].T
        positions = torch.arange(x.shape[1])[None]
        x = donor.model.layers[0](x, position_embeddings=donor.model.rotary_emb(x, positions), position_ids=positions)
        return main.lm_head(zero_centred_norm(x, mtp["mtp.norm.weight"]))


def test_mtp_head_loads_runs_as_defined_and_saves_under_the_released_names(tmp_path):
    main, donor, mtp = write_checkpoint_with_mtp(tmp_path)
    ours = load_model(str(tmp_path)).eval()
    assert ours.config.num_nextn_predict_layers == 1
    ids = torch.randint(0, 160, (2, 40))
    expected = reference_mtp_logits(main, donor, mtp, ids)
    with torch.no_grad():
        h = main.model(ids).last_hidden_state[:, :-1]
        positions = torch.arange(39)[None].expand(2, -1)
        got, _ = ours.mtp(ours.model.embed_tokens(ids[:, 1:]), h, *ours.rope(positions, h.dtype))
        assert max_diff(ours.lm_head(got), expected) < 1e-4
        # the training loss of the head: the summed cross-entropy of those logits against x[t+2], over the
        # batch's next-token targets (2 x 39)
        ours.train()
        loss = ours(ids, labels=ids).mtp_loss
        summed = F.cross_entropy(expected[:, :-1].reshape(-1, 160), ids[:, 2:].reshape(-1), reduction="sum")
        assert abs(loss.item() - summed.item() / 78) < 1e-4
    save_model(ours, str(tmp_path / "ours"))
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert {n for n in saved if n.startswith("mtp.")} == set(mtp)
    assert all(torch.equal(saved[n], t) for n, t in mtp.items())
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    # transformers reads the saved folder too (it leaves the MTP head out, as for a released checkpoint)
    back = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(back(ids).logits, main(ids).logits) < 1e-4


def test_a_declared_head_without_weights_loads_without_it(tmp_path):
    """transformers saves a released config (mtp_num_hidden_layers: 1) without the mtp.* tensors."""
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | {"mtp_num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_model(str(tmp_path))
    assert ours.mtp is None and ours.config.num_nextn_predict_layers == 0


@pytest.fixture(scope="module")
def corpus_rows(tiny):
    """The embedded corpus (task problems and prose) under the tiny checkpoint's 512-token tokenizer, in rows of 64."""
    tokenizer = load_tokenizer(tiny)
    ids = []
    for document in itertools.islice(data.synthetic_corpus("train", 1), 400):
        ids += tokenizer.encode(document) + [tokenizer.eos_token_id]
    return torch.tensor(ids[:len(ids) // 64 * 64]).view(-1, 64)


def test_mtp_loss_falls_and_is_logged_apart(corpus_rows, tmp_path):
    torch.manual_seed(0)
    model = load_model("nano-next-d4", vocab_size=512, mtp_loss_weight=0.5)
    batches = [dict(input_ids=corpus_rows[i:i + 4], labels=corpus_rows[i:i + 4]) for i in range(0, 4 * 25, 4)]
    trainer = Trainer(model, TrainConfig(steps=25, lr=3e-3, warmup_steps=2, out_dir=str(tmp_path), log_every=100,
                                         progress=False), iter(batches), device="cpu")
    records = [trainer.train_step() for _ in range(25)]
    mtp = [r["mtp_loss"] for r in records]
    assert sum(mtp[-5:]) / 5 < mtp[0] - 1.0, mtp
    assert all(r["loss"] > 0.5 * r["mtp_loss"] for r in records)  # the logged loss is the objective, MTP included
    model.eval()  # the held-out loss stays the next-token loss alone
    with torch.no_grad():
        assert getattr(model(corpus_rows[:4], labels=corpus_rows[:4]), "mtp_loss", None) is None


def test_routers_start_normalised_and_experts_evenly_chosen(corpus_rows):
    torch.manual_seed(0)
    model = load_model("nano-next-d4", vocab_size=512, num_experts=16, num_experts_per_tok=2).eval()
    routers = [m.gate.weight for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(routers) == 5  # four layers and the MTP head's
    for w in routers:
        assert torch.allclose(w.norm(dim=1), torch.full((16,), 0.02 * 256 ** 0.5), rtol=1e-5)
    with torch.no_grad():
        router_logits = model(corpus_rows[:16], output_router_logits=True).router_logits
    for logits in router_logits:  # each expert's share of the top-2 choices, relative to an even 1/16
        load = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=16).float()
        share = load / load.mean()
        assert share.min() > 0.3 and share.max() < 2.0, share


def mtp_reference_drafts(model, text: list[int], k: int) -> list[int]:
    """The k drafts of the definition, uncached: the head over every position of the text with the main model's
    hidden states (t reads token t+1), then chained on its own outputs, each step a full causal forward."""
    with torch.no_grad(), capture_hidden(model) as hidden:
        model(torch.tensor([text]))
    h, embeds = hidden[0][:, :-1], model.model.embed_tokens(torch.tensor([text[1:]]))
    drafts = []
    for depth in range(k):
        positions = torch.arange(h.shape[1])[None]
        out, _ = model.mtp(embeds, h, *model.rope(positions, h.dtype), depth=depth)
        drafts.append(int(model.lm_head(out[:, -1]).argmax()))
        h = torch.cat((h, out[:, -1:]), dim=1)  # chained: the head's output is the next depth's hidden state
        embeds = torch.cat((embeds, model.model.embed_tokens(torch.tensor([[drafts[-1]]]))), dim=1)
    return drafts


def copying_head(model):
    """A main model that mostly repeats the token it reads (its lm_head is its embedding, its layers add little),
    and an MTP head that hands the main model's hidden state through (fc picks it, the layer adds nothing): it
    drafts the token the main model chose at the position before, right whenever the text repeats a token."""
    H = model.config.hidden_size
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        for name, p in model.model.named_parameters():
            if "o_proj" in name or "out_proj" in name or "down_proj" in name:
                p.mul_(0.1)
        model.mtp.fc.weight.copy_(torch.cat((torch.zeros(H, H), torch.eye(H)), dim=1))
        for name, p in model.mtp.named_parameters():
            if "o_proj" in name or "down_proj" in name or "norm" in name:
                p.zero_()
    return model


def test_mtp_drafts_follow_the_definition_with_the_cache_in_step(tok):
    """Each step's drafts equal the uncached definition over the text so far: the head's keys of kept tokens are
    the true ones, those of rejected drafts are gone (a random head: most drafts are rejected)."""
    model = random_model(hybrid=True, num_nextn_predict_layers=1)
    engine = Engine(model, tok, batch_size=1, max_len=64, speculative="mtp", num_speculative_tokens=3)
    seen, draft = [], engine.drafter.draft

    def recorded(slots):
        row = engine.rows[slots[0]]
        drafts = draft(slots)
        seen.append((row.request.prompt_ids + row.token_ids, drafts[slots[0]]))
        return drafts
    engine.drafter.draft = recorded
    generate_batch(model, tok, [list(range(30, 50))], max_new_tokens=20, engine=engine, **GREEDY)
    assert len(seen) > 3
    for text, drafts in seen:
        assert drafts == mtp_reference_drafts(model, text, 3)


@pytest.mark.parametrize("head", ["random", "copying"])
def test_mtp_speculative_steps_give_the_plain_tokens(tok, head):
    """Greedy and seeded sampling with penalties, rows of different lengths, a pool small enough to preempt rows:
    the tokens of plain decoding; the copying head's drafts are often right (random models repeat themselves)."""
    model = random_model(hybrid=True, num_nextn_predict_layers=1)
    if head == "copying":
        copying_head(model)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], list(range(20, 34)), [5, 6], [9]]
    for knobs in (GREEDY, dict(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=3)):
        for batch_size, num_blocks in ((2, None), (3, 8)):
            plain = Engine(model, tok, batch_size=batch_size, max_len=64)
            reference = [r.token_ids for r in generate_batch(model, tok, prompts, max_new_tokens=30, engine=plain,
                                                             **knobs)]
            engine = Engine(model, tok, batch_size=batch_size, max_len=64, speculative="mtp",
                            num_speculative_tokens=3, num_blocks=num_blocks)
            assert [r.token_ids for r in generate_batch(model, tok, prompts, max_new_tokens=30, engine=engine,
                                                        **knobs)] == reference
            assert engine.drafted > 0 and (engine.preemptions > 0) == (num_blocks is not None)
            if head == "copying" and knobs is GREEDY:
                assert engine.accepted > engine.drafted / 3 and engine.launches < plain.launches


def test_mtp_drafts_need_a_head(tok):
    with pytest.raises(ValueError, match="multi-token-prediction head"):
        Engine(random_model(hybrid=True), tok, speculative="mtp")
