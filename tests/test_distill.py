"""Distillation: the divergences against torch's kl_div and hand-computed numbers, the answer-only mask, padded
vocabulary rows, the tokenizer check, compute accounting against the formula, and both modes end to end through
the CLI on tiny models (a scripted teacher for off-policy, a random one for on-policy)."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoqwen import cli, data
from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.config import get_preset
from nanoqwen.checkpoint import load
from nanoqwen.generation import encode_prompt
from nanoqwen.tokenizer import train_tokenizer
from nanoqwen.train import posttrain
from nanoqwen.train.distill import (DistillConfig, OnPolicy, check_same_tokenizer, distill_loss, prepare_student,
                                    token_divergence, with_mode)
from nanoqwen.train.grpo import GRPOConfig, run_grpo
from nanoqwen.train.sft import encode_conversation
from nanoqwen.train.trainer import Compute
from nanoqwen.checkpoint import latest_checkpoint
from test_engine import chain, scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")
FILTER = ["--tasks", "arithmetic", "--difficulty", "1", "--languages", "en", "--no-progress"]


def fwd_kl(p_logits, q_logits):
    """KL(p || q) per row by torch's own kl_div (input = log q, target = log p)."""
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)


# --- divergences ------------------------------------------------------------------------------------------------

def test_reverse_and_forward_kl_match_kl_div():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11) * 2, torch.randn(5, 11) * 2
    assert torch.allclose(token_divergence(student, teacher, "forward"), fwd_kl(teacher, student), atol=1e-6)
    assert torch.allclose(token_divergence(student, teacher, "reverse"), fwd_kl(student, teacher), atol=1e-6)
    assert not torch.allclose(fwd_kl(teacher, student), fwd_kl(student, teacher), atol=1e-3)  # they differ
    assert token_divergence(teacher, teacher, "reverse").abs().max() < 1e-6


def test_jsd_by_hand_and_its_limits():
    p, q = [0.8, 0.2], [0.4, 0.6]  # teacher, student
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    for beta in (0.5, 0.3):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m))
        kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m))
        expected = beta * kl_pm + (1 - beta) * kl_qm
        assert token_divergence(student, teacher, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)
    # by hand, beta 0.5: m = (0.6, 0.4); KL(p||m) = 0.8 ln(4/3) + 0.2 ln(1/2) = 0.091516,
    # KL(q||m) = 0.4 ln(2/3) + 0.6 ln(3/2) = 0.081093; JSD = (0.091516 + 0.081093) / 2 = 0.086305
    assert token_divergence(student, teacher, "jsd", beta=0.5).item() == pytest.approx(0.086305, abs=1e-6)
    # JSD(beta) / beta -> KL(p || q) as beta -> 0; JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    small, big = 1e-3, 1 - 1e-3
    forward, reverse = fwd_kl(teacher, student), fwd_kl(student, teacher)
    assert torch.allclose(token_divergence(student, teacher, "jsd", beta=small) / small, forward, rtol=1e-2)
    assert torch.allclose(token_divergence(student, teacher, "jsd", beta=big) / (1 - big), reverse, rtol=1e-2)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(student, teacher, "jsd", beta=1.0)


def test_top_k_renormalises_both_over_the_teachers_top_k():
    torch.manual_seed(2)
    student, teacher, k = torch.randn(3, 10), torch.randn(3, 10), 4
    got = token_divergence(student, teacher, "reverse", top_k=k)
    for row in range(3):
        top = sorted(range(10), key=lambda v: -teacher[row, v].item())[:k]  # the teacher's k most likely tokens
        p, q = teacher[row].softmax(-1)[top], student[row].softmax(-1)[top]
        p, q = p / p.sum(), q / q.sum()
        expected = F.kl_div(p.log(), q, reduction="sum")  # KL(q~ || p~)
        assert got[row].item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(token_divergence(student, teacher, "forward", top_k=10), fwd_kl(teacher, student),
                          atol=1e-6)  # k = V is the whole vocabulary


def test_loss_counts_answer_positions_only_and_ignores_padded_vocab_rows():
    torch.manual_seed(3)
    B, T, V = 2, 6, 9
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = sum(fwd_kl(student[b, t], teacher[b, t]) for b in range(B) for t in range(T) if mask[b, t]) / 5
    assert distill_loss(student, teacher, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # other positions (the prompt, padding) can hold anything
    changed_s, changed_t = student.clone(), teacher.clone()
    changed_s[~mask], changed_t[~mask] = 100.0, -100.0
    assert distill_loss(changed_s, changed_t, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # embedding rows past the tokenizer (vocab_size rounded up) never count, whatever their logits
    padded_s = torch.cat([student, torch.full((B, T, 7), 50.0)], -1)
    padded_t = torch.cat([teacher, torch.randn(B, T, 7) * 30], -1)
    assert distill_loss(padded_s, padded_t, mask, vocab_size=V).item() == pytest.approx(expected.item(), abs=1e-6)


# --- compute accounting -----------------------------------------------------------------------------------------

def matmul_weights(model) -> int:
    """Parameters that multiply every token: all of them but an untied input embedding (a lookup)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if "embed_tokens" not in name or model.config.tie_word_embeddings)


def test_compute_arithmetic_matches_the_formula():
    config = get_preset("nano-d2", vocab_size=512)
    model = load_model("nano-d2", vocab_size=512, device="meta")
    N, L, H, d = matmul_weights(model), config.num_hidden_layers, config.num_attention_heads, config.head_dim
    compute = Compute()
    compute.generate(config, [3, 4], [5, 0])         # two rows: 8 and 4 tokens through forward passes
    compute.score(config, [(2, 10)])
    compute.train(config, [(2, 10), (1, 6)])
    record = compute.step(world_size=1, write=False)
    generation = 8 * (2 * N + 2 * L * H * d * 8) + 4 * (2 * N + 2 * L * H * d * 4)
    scoring = 20 * (2 * N + 2 * L * H * d * 10)
    training = 20 * (6 * N + 6 * L * H * d * 10) + 6 * (6 * N + 6 * L * H * d * 6)
    assert record == dict(generated_tokens=5, prompt_tokens=7, scored_tokens=20, trained_tokens=26,
                          flops=pytest.approx(generation + scoring + training),
                          total_flops=pytest.approx(generation + scoring + training))
    assert compute.totals["generation_flops"] == pytest.approx(generation)
    assert compute.totals["tokens"] == 5 + 7 + 20 + 26 and compute.totals["steps"] == 1
    compute.train(config, [(1, 6)])
    second = compute.step(world_size=2, write=False)  # each rank did the same work
    assert second["trained_tokens"] == 12 and second["generated_tokens"] == 0
    assert second["total_flops"] == pytest.approx(generation + scoring + training + 2 * 6 * (6 * N + 36 * L * H * d))


def test_grpo_counts_rollouts_old_logprobs_and_each_iteration(tiny, tmp_path):
    model, tokenizer = load(tiny, dtype=torch.float32, device="cpu")
    prompts = posttrain.rl_prompts(2, tasks=["arithmetic"], difficulty=(1, 1), languages=["en"])
    config = GRPOConfig(prompts_per_step=2, group_size=2, iterations=2, micro_batch=2, max_new_tokens=4)
    run_grpo(model, tokenizer, prompts, str(tmp_path), 1, config, lr=1e-4, device="cpu", log_every=1)
    total = json.load(open(tmp_path / "compute.json"))
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rl = [json.loads(line) for line in open(tmp_path / "rl_metrics.jsonl")]
    assert total["steps"] == 2 and total["generated_tokens"] == round(rl[0]["response_length"] * 4)
    assert total["trained_tokens"] == 2 * total["scored_tokens"] == sum(s["tokens"] for s in steps)  # 2 iterations
    assert steps[0]["generated_tokens"] > 0 and steps[1]["generated_tokens"] == 0  # one rollout, two updates
    assert total["flops"] == pytest.approx(sum(s["flops"] for s in steps)) == pytest.approx(rl[0]["total_flops"])


# --- teacher and student ----------------------------------------------------------------------------------------

def test_tokenizer_mismatch_is_one_clear_error(tiny, tmp_path, capsys):
    other = str(tmp_path / "other")
    tokenizer = train_tokenizer(["a different corpus with other words\n"] * 50, 300, other)
    save_model(load_model("nano-d2", vocab_size=320), other)
    with pytest.raises(SystemExit):
        cli.main(["distill", "--teacher", tiny, "--student", other, "--mode", "on", "--out", str(tmp_path / "o"),
                  "--samples", "2", *FILTER])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"teacher {tiny} and student {other} do not share a tokenizer" in err
    assert "vocabulary sizes differ (512 vs 300)" in err
    same_size = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0, 0.0, 1.0), 300), 512)
    assert same_size.vocab_size == 512
    with pytest.raises(ValueError, match="encode a probe text differently"):
        check_same_tokenizer(load(tiny, device="cpu")[1], same_size, "T", "S")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        prepare_student("./missing/student", tiny, tokenizer, str(tmp_path))


@pytest.fixture(scope="module")
def scripted_teacher(tmp_path_factory):
    """A teacher that answers: in thinking mode "<think>a</think>\\n\\n7", without thinking "7". Its 300-token
    tokenizer (not a multiple of 64) makes "\\n\\n" one token, so the two generation prompts end differently."""
    path = str(tmp_path_factory.mktemp("scripted") / "teacher")
    texts = list(itertools.islice(data.synthetic_corpus("train", 0), 300)) + ["one\n\ntwo\n\nthree\n\n"] * 200
    tok = train_tokenizer(texts, 300, path)
    messages = [{"role": "user", "content": "What is 2 + 5?"}]
    think_end, blank_end = (encode_prompt(tok, *with_mode(messages, think))[-1] for think in (True, False))
    word, answer = tok.encode("a")[0], tok.encode("7")[0]
    script = chain(think_end, tok.think_start_id, word, tok.think_end_id, blank_end, answer, tok.eos_token_id)
    assert len(script) == 6 and blank_end == tok.encode("\n\n")[0]  # a chain that never revisits a token
    save_model(scripted_model(script, vocab_size=tok.vocab_size), path)
    return path


def test_off_policy_end_to_end(scripted_teacher, tmp_path):
    out = tmp_path / "off"
    cli.main(["distill", "--teacher", scripted_teacher, "--student", "nano-d2", "--mode", "off", "--out", str(out),
              "--steps", "2", "--samples", "3", "--batch-size", "2", "--max-new-tokens", "8", "--log-every", "1",
              *FILTER])
    records = [json.loads(line) for line in open(out / "distill_off.jsonl")]
    assert [r["mode"] for r in records] == ["think", "no_think"] * 3
    _, tok = load(scripted_teacher, device="cpu")
    for r in records:
        user, reply = r["messages"]
        think = r["mode"] == "think"
        assert user["content"].endswith(" /think" if think else " /no_think")
        assert reply == {"role": "assistant", "reasoning_content": "a" if think else "", "content": "7"}
        ids, labels = encode_conversation(tok, r, 1024)
        learned = tok.decode([t for t in labels if t != -100])
        assert learned == ("<think>\na\n</think>\n\n7<|im_end|>" if think else "<think>\n\n</think>\n\n7<|im_end|>")
    # the student: a fresh nano-d2 with the teacher's tokenizer, vocab rounded up to 320; HF checkpoints
    student, student_tok = load(latest_checkpoint(str(out)), device="cpu")
    assert student.config.vocab_size == 320 and student.config.hidden_size == 128
    check_same_tokenizer(tok, student_tok, "teacher", "student")
    assert (out / "student_init" / "tokenizer.json").exists() and (out / "step_000002").is_dir()
    # compute: 3 x 6 thinking tokens + 3 x 2 direct tokens generated by the teacher, then 2 SFT steps
    total = json.load(open(out / "compute.json"))
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    teacher = load_model(scripted_teacher)
    prompts = [encode_prompt(tok, r["messages"][:1], None if r["mode"] == "think" else False) for r in records]
    lengths = [len(p) + (6 if r["mode"] == "think" else 2) for p, r in zip(prompts, records)]
    c = teacher.config
    generation = sum(n * (2 * matmul_weights(teacher) + 2 * c.num_hidden_layers * c.num_attention_heads
                          * c.head_dim * n) for n in lengths)
    s = student.config
    training = sum(r["tokens"] * (6 * matmul_weights(student) + 6 * s.num_hidden_layers * s.num_attention_heads
                                  * s.head_dim * r["tokens"] // 2) for r in steps)
    assert total["generated_tokens"] == 24 and total["prompt_tokens"] == sum(map(len, prompts))
    assert total["generation_flops"] == pytest.approx(generation) and total["scored_tokens"] == 0
    assert total["training_flops"] == pytest.approx(training)
    assert total["trained_tokens"] == sum(r["tokens"] for r in steps) and total["steps"] == 2
    assert steps[0]["generated_tokens"] == 24 and steps[-1]["total_flops"] == pytest.approx(total["flops"])


def test_on_policy_end_to_end_with_padded_vocabularies(scripted_teacher, tmp_path):
    """The student (320 rows) and the teacher (300 rows) compare over the tokenizer's 300 ids; over 12 steps the
    divergence to the (deterministic) teacher on the student's own answers falls to almost nothing."""
    out = tmp_path / "on"
    cli.main(["distill", "--teacher", scripted_teacher, "--student", "nano-d2", "--mode", "on", "--out", str(out),
              "--steps", "12", "--lr", "1e-2", "--samples", "4", "--batch-size", "2", "--max-new-tokens", "6",
              "--divergence", "jsd", "--beta", "0.3", "--top-k", "16", "--log-every", "1", *FILTER])
    model, tok = load(latest_checkpoint(str(out)), device="cpu")
    assert model.config.vocab_size == 320 and tok.vocab_size == 300 and (out / "step_000012").is_dir()
    total = json.load(open(out / "compute.json"))
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert total["scored_tokens"] == total["trained_tokens"] == sum(r["tokens"] for r in steps)  # one teacher pass
    assert 0 < total["generated_tokens"] <= 12 * 2 * 6 and total["steps"] == 12
    losses = [r["loss"] for r in steps]
    print("on-policy losses", [round(x, 4) for x in losses])
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < 0.1 * sum(losses[:4])
    assert total["flops"] == pytest.approx(sum(r["flops"] for r in steps))


def test_on_policy_batch_loss_and_learning(tiny):
    teacher, tok = load(tiny, dtype=torch.float32, device="cpu")
    torch.manual_seed(5)
    student = load_model("nano-d2", vocab_size=512)
    with torch.no_grad():  # a teacher with opinions: sharper than a fresh init
        teacher.lm_head.weight.mul_(2.0)
    prompts = posttrain.rl_prompts(4, tasks=["arithmetic"], difficulty=(1, 1), languages=["en"])
    source = OnPolicy(student, teacher, tok, prompts, 4, DistillConfig(max_new_tokens=8, think_fraction=0.5))
    batch = source.sample()
    # the labels are the sampled answer; the prompt is never a target
    labels, ids = batch["labels"], batch["input_ids"]
    n_answer = (labels != -100).sum().item()
    assert 0 < n_answer <= 4 * 8 and (labels[:, :10] == -100).all()
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    # the loss: reverse KL at the positions that predict an answer token, by kl_div, row by row
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
    per_token = [fwd_kl(s_logits[b, t], t_logits[b, t]) for b in range(4) for t in range(ids.shape[1] - 1)
                 if labels[b, t + 1] != -100]
    loss, count = source.loss(student, batch)
    assert count.item() == n_answer == len(per_token)
    assert loss.item() == pytest.approx((sum(per_token) / len(per_token)).item(), rel=1e-5)
    # on this fixed batch, the divergence to the fixed teacher falls
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = source.loss(student, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 5, losses
