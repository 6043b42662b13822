"""Post-training: the GRPO loss and advantages by hand, SFT loss masks, the rewards, the code sandbox, malformed
JSONL reporting, and each command end to end on a tiny model (every stage writes a loadable checkpoint)."""
import json
import math
import time

import pytest
import torch

from nanoqwen import cli, report
from nanoqwen.checkpoint import load
from nanoqwen.tasks import sample_examples, to_messages
from nanoqwen.train import evaluate, posttrain, rewards
from nanoqwen.train.grpo import GRPO, GRPOConfig, group_advantages, grpo_loss, token_logprobs
from nanoqwen.train.reward_model import bt_loss
from nanoqwen.train.sandbox import run_code
from nanoqwen.train.sft import encode_conversation, pad_batch, read_jsonl
from nanoqwen.checkpoint import latest_checkpoint

FILTER = ["--tasks", "arithmetic,lists", "--difficulty", "1", "--languages", "en", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `tiny` comes from there too


# --- GRPO math ------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r, eps=0.0 + 1e-4)
    # group 1: mean 0.5, population std 0.5 -> +-1 (up to eps); group 2: no spread -> all 0
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))


def test_grpo_loss_by_hand():
    # two responses, three token slots; the second response has 2 tokens (mask 0 on its last slot)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.7, 1.1, 9.0]]))  # ratios, since old logp = 0
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # row 1 (A=+1): min(1.5, 1.28)=1.28 (clipped), min(1.0,1.0)=1.0, min(0.5,0.5)=0.5 (no lower clip for A>0)
    # row 2 (A=-2): min(-1.4, clip 0.8 -> -1.6) = -1.6 (clipped), min(-2.2, -2.2) = -2.2
    # loss = -(1.28 + 1.0 + 0.5 - 1.6 - 2.2) / 5 tokens = 1.02 / 5 = 0.204; 2 of 5 tokens clipped
    assert loss.item() == pytest.approx(0.204, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.4)
    # the KL term: ref = logp adds nothing; ref != logp adds kl_coef * (e^d - d - 1) averaged over tokens
    same, _ = grpo_loss(logp, old, adv, mask, ref_logp=logp, kl_coef=0.5)
    assert same.item() == pytest.approx(0.204, abs=1e-6)
    shifted, _ = grpo_loss(logp, old, adv, mask, ref_logp=logp + 1.0, kl_coef=0.5)
    assert shifted.item() == pytest.approx(0.204 + 0.5 * (math.e - 2), abs=1e-5)


def test_token_logprobs_are_those_of_the_sampling_temperature():
    class Fixed(torch.nn.Module):  # the same logits at every position
        def forward(self, ids):
            return type("Out", (), {"logits": torch.tensor([[[2.0, 0.0, 0.0]]]).expand(*ids.shape, 3)})()
    ids = torch.tensor([[0, 1, 0]])
    for t in (1.0, 0.5):
        expected = torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]) / t, -1)[[1, 0]]
        assert torch.allclose(token_logprobs(Fixed(), ids, temperature=t)[0][0], expected)


def test_grpo_loss_gradient_is_zero_when_clipped():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    grpo_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))[0].backward()
    assert logp.grad.item() == 0.0  # ratio above 1 + clip_high with A > 0: no push further


def clipped_objective(logp, old_logp, advantages, mask, clip_low, clip_high):
    """The GRPO/DAPO token-level loss written out: -min(r A, clip(r, 1 - low, 1 + high) A), mean over tokens."""
    ratio, a = (logp - old_logp).exp(), advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    return ((per_token * mask).sum() / mask.sum()).item()


def test_cli_clip_bounds_reach_the_loss_the_trainer_calls(tiny, tmp_path, monkeypatch):
    """`nanoqwen rl --clip-low 0.1 --clip-high 0.5` -> GRPOConfig -> GRPO.loss -> the Trainer's optimizer steps: each
    step's loss is the clipped objective with those bounds, on ratios that a large learning rate pushes past both."""
    from nanoqwen.train import grpo as grpo_module
    calls, real = [], grpo_module.grpo_loss

    def recording(logp, old_logp, advantages, mask, *args, **kwargs):
        loss, stats = real(logp, old_logp, advantages, mask, *args, **kwargs)
        calls.append((logp.detach(), old_logp.detach(), advantages, mask, loss.item()))
        return loss, stats
    monkeypatch.setattr(grpo_module, "grpo_loss", recording)
    monkeypatch.setattr(rewards, "score", lambda record, text, *a: (float(len(text) % 3), 0.0))  # a reward spread
    cli.main(["rl", "--stage", "reasoning", "--model", tiny, "--out", str(tmp_path / "rl"), "--steps", "1",
              "--samples", "2", "--prompts-per-step", "2", "--group-size", "4", "--micro-batch", "8", "--iterations",
              "3", "--max-new-tokens", "8", "--lr", "0.05", "--clip-low", "0.1", "--clip-high", "0.5", *FILTER])
    assert len(calls) == 3  # one micro-batch per optimizer step, three passes over the rollout
    for logp, old_logp, advantages, mask, loss in calls:
        assert loss == pytest.approx(clipped_objective(logp, old_logp, advantages, mask, 0.1, 0.5), abs=1e-6)
    logp, old_logp, advantages, mask, loss = calls[-1]
    ratio, a = (logp - old_logp).exp(), advantages[:, None].expand_as(logp)
    assert ((ratio > 1.5) & (a > 0) & (mask > 0)).any() and ((ratio < 0.9) & (a < 0) & (mask > 0)).any()
    assert loss != pytest.approx(clipped_objective(logp, old_logp, advantages, mask, 0.5, 0.1), abs=1e-3)


# --- SFT masks and data files ---------------------------------------------------------------------------------

def test_sft_labels_cover_only_the_assistant(tiny):
    _, tokenizer = load(tiny, device="cpu")
    ex = sample_examples(1, tasks=["arithmetic"], difficulty=1, languages=["en"])[0]
    ids, labels = encode_conversation(tokenizer, {"messages": to_messages(ex, thinking=True)}, 4096)
    text = tokenizer.decode([t for t in labels if t != -100])
    assert text.startswith("<think>") and text.endswith("<|im_end|>") and ex.question not in text
    assert ex.answer in text and "<|im_start|>" not in text
    two_turns = [{"role": "user", "content": "1 + 1? /no_think"},
                 {"role": "assistant", "content": "Answer: 2", "weight": 0},
                 {"role": "user", "content": "2 + 5?"}, {"role": "assistant", "content": "Answer: 7"}]
    _, context_labels = encode_conversation(tokenizer, {"messages": two_turns}, 4096)
    assert tokenizer.decode([t for t in context_labels if t != -100]) == "<think>\n\n</think>\n\nAnswer: 7<|im_end|>"
    two_turns[1].pop("weight")
    _, both = encode_conversation(tokenizer, {"messages": two_turns}, 4096)
    assert tokenizer.decode([t for t in both if t != -100]).startswith("Answer: 2<|im_end|>")
    batch = pad_batch([(ids, labels), (ids[:5], [-100] * 5)], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids)) and (batch["labels"][1] == -100).all()


def test_malformed_jsonl_is_reported_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "conv.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                               json.dumps({"messages": [{"role": "wizard"}]}), good]) + "\n")
    assert len(read_jsonl(str(path))) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: skipped: not valid JSON" in err and f"{path}:3: skipped: no assistant turn" in err
    assert f"{path}:4: skipped: message 0 needs a role" in err and "3 malformed line(s) skipped, 2 kept" in err
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_jsonl(str(path), on_bad_line="error")


# --- rewards ----------------------------------------------------------------------------------------------------

RECORD = dict(messages=[{"role": "user", "content": "What is 2 + 3? /think"}], verifier="arithmetic", answer="5")


def test_format_and_verifier_rewards():
    good = "<think>\n2 + 3 = 5\n</think>\n\nAnswer: 5<|im_end|>"
    assert rewards.format_reward(good) == 1.0 and rewards.verifier_reward(good, RECORD) == 1.0
    assert rewards.format_reward("Answer: 5") == 0.0 and rewards.verifier_reward("Answer: 5", RECORD) == 1.0
    assert rewards.format_reward("<think>\n\n</think>\n\nAnswer: 5") == 0.0  # empty reasoning is not long CoT
    assert rewards.format_reward("<think>\nhm\n</think><think>x</think>Answer: 5") == 0.0
    assert rewards.verifier_reward("<think>\nAnswer: 5\n</think>\n\nAnswer: 6", RECORD) == 0.0  # only after </think>
    assert rewards.score(RECORD, good) == (1.2, 1.0)


def test_think_follow_and_flags():
    assert rewards.latest_flag([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi"}]) is False
    assert rewards.latest_flag([{"role": "user", "content": "a /no_think"}, {"role": "assistant", "content": "x"},
                                {"role": "user", "content": "b /think"}]) is True
    assert rewards.latest_flag([{"role": "user", "content": "plain"}]) is None
    assert rewards.think_follow_reward("<think>\nsteps\n</think>\n\nAnswer: 1", True) == 1.0
    assert rewards.think_follow_reward("<think>\n\n</think>\n\nAnswer: 1", True) == 0.0
    assert rewards.think_follow_reward("<think>\n\n</think>\n\nAnswer: 1", False) == 1.0
    assert rewards.think_follow_reward("Answer: 1", False) == 0.0  # the empty block must be there


def test_instruction_constraints():
    text = "<think>\n\n</think>\n\nAnswer: 42 apples"
    assert rewards.constraint_reward(text, [{"kind": "max_words", "value": 3}]) == 1.0
    assert rewards.constraint_reward(text, [{"kind": "max_words", "value": 2}]) == 0.0
    assert rewards.constraint_reward(text, [{"kind": "keywords", "value": ["apples"]},
                                            {"kind": "starts_with", "value": "Answer"},
                                            {"kind": "language", "value": "fr"},
                                            {"kind": "forbidden", "value": ["apple"]}]) == 0.5
    assert rewards.detect_language("答案：42") == "zh" and rewards.detect_language("Réponse : 42") == "fr"
    assert rewards.constraint_reward("- a\n- b", [{"kind": "bullets", "value": 2}]) == 1.0


def test_judge_reward_is_the_yes_probability(tiny):
    judge, tokenizer = load(tiny, device="cpu")
    yes, no = tokenizer.encode("yes")[0], tokenizer.encode("no")[0]
    p = rewards.judge_reward(judge, tokenizer, "2+3?", "5", "Answer: 5")
    assert 0.0 < p < 1.0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": rewards.JUDGE_PROMPT.format(
        question="2+3?", reference="5", response="Answer: 5")}], add_generation_prompt=True, enable_thinking=False)
    logits = judge(torch.tensor([ids])).logits[0, -1]
    assert p == pytest.approx(torch.sigmoid(logits[yes] - logits[no]).item(), abs=1e-5)


def test_bradley_terry_loss_and_reward_head_on_a_toy():
    assert bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert bt_loss(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0])).item() == pytest.approx(
        (-math.log(torch.sigmoid(torch.tensor(2.0)).item()) - math.log(torch.sigmoid(torch.tensor(-2.0)).item())) / 2,
        abs=1e-6)
    # a linear scalar head learns to prefer the features of chosen over rejected
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 1, bias=False)
    chosen, rejected = torch.randn(64, 4) + torch.tensor([3.0, 0, 0, 0]), torch.randn(64, 4)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(50):
        loss = bt_loss(head(chosen).squeeze(-1), head(rejected).squeeze(-1))
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.5 and head.weight[0, 0] > 0.5


# --- the sandbox ------------------------------------------------------------------------------------------------

def test_sandbox_runs_code_with_input():
    result = run_code("print(int(input()) * 2)", stdin="21\n")
    assert result.ok and result.stdout.strip() == "42"


def test_sandbox_limits():
    timed = run_code("while True: pass", timeout=1.0)
    assert timed.timed_out and not timed.ok
    memory = run_code("x = bytearray(1 << 30)", memory_mb=128)
    assert not memory.ok and "MemoryError" in memory.stderr
    network = run_code("import socket; socket.socket()")
    assert not network.ok and "PermissionError" in network.stderr
    spawn = run_code("import os; os.system('echo hi')")
    assert not spawn.ok and "PermissionError" in spawn.stderr and "hi" not in spawn.stdout
    where = run_code("import os; open('made', 'w').write('x'); print(os.getcwd()); print(sorted(os.environ))")
    cwd = where.stdout.splitlines()[0]
    assert cwd == "/sandbox" and where.stdout.splitlines()[1] in ("[]", "['LC_CTYPE']")
    import os
    assert not os.path.exists(os.path.join(cwd, "made"))  # a private working directory, gone afterwards


CODE = dict(messages=[{"role": "user", "content": "Read two integers and print their sum. /think"}], reward="code",
            tests=[["2 3\n", "5"], ["10 -4\n", "6"]], timeout=2)
PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_code_reward_runs_the_answer_on_the_tests_in_the_sandbox():
    assert rewards.extract_code("x\n```python\nprint(1)\n```\ny\n```py\nprint(2)\n```") == "print(2)\n"  # the last
    good = f"<think>\nread, add, print\n</think>\n\nHere it is:\n```python\n{PROGRAM}```<|im_end|>"
    assert rewards.score(CODE, good) == (1.2, 1.0)  # all tests pass + the format bonus
    assert rewards.score(CODE, good.replace("a + b", "a + b if a < 5 else 0")) == (pytest.approx(0.7), 0.0)
    assert rewards.code_reward(f"<think>\nx\n</think>\n\n{PROGRAM}", CODE) == 1.0  # no fence: the whole answer
    assert rewards.code_reward(f"<think>\n```python\n{PROGRAM}```\n</think>\n\nno code", CODE) == 0.0  # not thoughts
    started = time.time()
    assert rewards.code_reward("```python\nwhile True: pass\n```", CODE) == 0.0
    assert time.time() - started < 2 * 2 + 3  # each test is stopped at the record's timeout
    # unsandboxed this would print 5 and pass the first test; the sandbox refuses the socket first
    assert rewards.code_reward("import socket\nsocket.socket()\nprint(5)", CODE) == 0.0


def test_rl_prompt_records_are_checked_as_they_are_read(tmp_path, capsys):
    user = [{"role": "user", "content": "q"}]
    records = [CODE, dict(messages=user, verifier="arithmetic", answer="5"), dict(messages=user, reward="magic"),
               dict(messages=user, verifier="alchemy", answer="1"), dict(messages=user),
               dict(messages=user, reward="code", tests=[["1"]]), dict(messages=user, reward="rule",
                                                                      constraints=[{"kind": "rhymes"}]),
               dict(messages=user, reward="judge"), dict(messages=[{"role": "system", "content": "s"}], answer="1"),
               dict(CODE, timeout=-1)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_jsonl(str(path), rewards.check_record) == records[:2]
    err = capsys.readouterr().err
    for line, reason in [(3, "unknown reward kind 'magic'"), (4, "unknown verifier 'alchemy'"),
                         (5, "a 'verifier' reward needs 'verifier' and 'answer'"), (6, "a 'code' reward needs 'tests'"),
                         (7, "'constraints' must be a list"), (8, "a 'judge' reward needs a reference 'answer'"),
                         (9, "a prompt needs a 'messages' list with a user turn"), (10, "'timeout' must be positive")]:
        assert f"{path}:{line}: skipped: {reason}" in err


def test_rl_on_code_prompts_end_to_end(tiny, tmp_path, capsys, monkeypatch):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(CODE) + "\n" + json.dumps(dict(CODE, tests=[["7 1\n", "8"]])) + "\n")
    runs = []  # the stdin of every sandboxed run

    def spy(code, stdin, **limits):
        runs.append(stdin)
        return run_code(code, stdin, **limits)
    monkeypatch.setattr(rewards, "run_code", spy)
    rl = ["rl", "--stage", "general", "--model", tiny, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
          "--micro-batch", "2", "--max-new-tokens", "8", "--no-progress"]
    cli.main([*rl, "--prompts", str(path), "--out", str(tmp_path / "rl")])
    assert sorted(runs) == ["10 -4\n"] * 2 + ["2 3\n"] * 2 + ["7 1\n"] * 2  # every answer, on each of its tests
    assert load(latest_checkpoint(str(tmp_path / "rl")), device="cpu")
    path.write_text(json.dumps(dict(messages=CODE["messages"], reward="judge", answer="5")) + "\n")
    with pytest.raises(SystemExit) as stopped:
        cli.main([*rl, "--prompts", str(path), "--out", str(tmp_path / "judged")])
    assert stopped.value.code == 2
    assert 'prompts with "reward": "judge" need --judge CHECKPOINT' in capsys.readouterr().err


# --- data builders and the commands, end to end ---------------------------------------------------------------

def test_fusion_data_mixes_modes(tiny):
    data_ = posttrain.fusion_data(tiny, 48, samples=1, tasks=["lists"], difficulty=(1, 1), languages=["en"])
    # an untrained model verifies nothing: thinking samples fall back to the generator's verified traces
    assert len(data_) == 48
    thinking = [r for r in data_ if rewards.latest_flag(r["messages"]) is not False]
    direct = [r for r in data_ if rewards.latest_flag(r["messages"]) is False]
    assert len(thinking) + len(direct) == 48 and thinking and direct  # the shares: the test below, at scale
    for record in thinking:  # the latest flag (or none: thinking is the default) asks to think, and the answer does
        assert record["messages"][-1]["reasoning_content"].strip()
        assert "Answer: " in record["messages"][-1]["content"]
    for record in direct:
        assert record["messages"][-1]["reasoning_content"] == ""
    assert any(len(r["messages"]) > 2 for r in data_)  # multi-turn dialogues
    assert any(r["messages"][0]["role"] == "system" for r in data_)  # a flag in a system message (seeded mix)


def thinking_share(multi_turn: float, unflagged: float) -> float:
    """The share of thinking samples the mix's settings ask for. Single turns: unflagged ones think, the rest are
    /think and /no_think half and half. Dialogues of 2 or 3 turns, each flag /think, /no_think or none (the mode
    carries over; none at all: thinking): the last turn thinks with probability 5/9 (2 turns) or 14/27 (3)."""
    return (1 - multi_turn) * (unflagged + (1 - unflagged) / 2) + multi_turn * (5 / 9 + 14 / 27) / 2


@pytest.mark.parametrize("multi_turn,unflagged", [(0.3, 0.2), (0.6, 0.5)])
def test_fusion_mix_has_the_configured_shares(tiny, monkeypatch, multi_turn, unflagged):
    """2,000 samples (the model's answers stubbed out: none verifies, as from an untrained model): the thinking,
    multi-turn and unflagged shares are the configured ones, within 3 standard errors."""
    n = 2000
    monkeypatch.setattr(posttrain, "generate_batch", lambda model, tok, prompts, **kw: [type("R", (), {"text": ""})]
                        * len(prompts))
    mix = posttrain.fusion_data(tiny, n, samples=1, multi_turn=multi_turn, unflagged=unflagged, tasks=["lists"],
                                difficulty=(1, 1), languages=["en"])
    last_users = [[m for m in r["messages"] if m["role"] == "user"][-1]["content"] for r in mix]
    shares = dict(thinking=sum(rewards.latest_flag(r["messages"]) is not False for r in mix) / n,
                  multi_turn=sum(len(r["messages"]) > 3 for r in mix) / n,
                  unflagged=sum(len(r["messages"]) == 2 and not u.endswith(("/think", "/no_think"))
                                for r, u in zip(mix, last_users)) / n)
    expected = dict(thinking=thinking_share(multi_turn, unflagged), multi_turn=multi_turn,
                    unflagged=(1 - multi_turn) * unflagged)
    for name, p in expected.items():
        assert abs(shares[name] - p) <= 3 * math.sqrt(p * (1 - p) / n), (name, shares[name], p)
    for record in mix:  # the learned (last) answer thinks exactly when the latest flag asks for it
        thinks = rewards.latest_flag(record["messages"]) is not False
        assert bool(record["messages"][-1]["reasoning_content"]) == thinks


def test_coldstart_drops_repetitive_traces():
    assert posttrain.is_repetitive("a\nb\na\na") and not posttrain.is_repetitive("a\nb\nc")


def test_every_command_writes_a_loadable_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path
    cli.main(["sft", "--stage", "coldstart", "--model", tiny, "--out", str(out / "cold"), "--steps", "2",
              "--samples", "8", "--batch-size", "4", *FILTER])
    assert (out / "cold" / "coldstart.jsonl").exists()
    rl = ["--steps", "1", "--samples", "4", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "2",
          "--max-new-tokens", "8", *FILTER]
    cli.main(["rl", "--stage", "reasoning", "--model", str(out / "cold"), "--out", str(out / "rl"), *rl])
    metrics = [json.loads(line) for line in open(out / "rl" / "rl_metrics.jsonl")]
    assert {"reward", "accuracy", "response_length", "entropy", "clip_fraction"} <= set(metrics[0])
    cli.main(["sft", "--stage", "fusion", "--model", str(out / "rl"), "--out", str(out / "fusion"), "--steps", "2",
              "--samples", "8", "--batch-size", "4", *FILTER])
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(dict(messages=[{"role": "user", "content": f"{i} + 1?"}],
                                               chosen=f"Answer: {i + 1}", rejected=f"Answer: {i}"))
                               for i in range(6)) + "\nnot json\n")
    cli.main(["rm", "--model", str(out / "fusion"), "--out", str(out / "rm"), "--pairs", str(pairs), "--steps", "2",
              "--batch-size", "2", *FILTER])
    assert f"{pairs}:7: skipped" in capsys.readouterr().err
    cli.main(["rl", "--stage", "general", "--model", str(out / "fusion"), "--out", str(out / "general"),
              "--judge", tiny, "--rm", str(out / "rm"), *rl])
    cli.main(["eval", "--model", str(out / "general"), "--out", str(out / "eval"), "--samples", "4", "--k", "2",
              "--budgets", "0,8,inf", "--max-new-tokens", "12", "--tasks", "lists", "--difficulty", "1"])
    report = json.load(open(out / "eval" / "eval.json"))
    assert [b["budget"] for b in report["budget_curve"]] == [0, 8, None] and (out / "eval" / "budget.png").exists()
    # what the numbers measure is checked on a model of known behaviour (test_eval_measures_think_follow_...)
    assert {"think_follow", "no_think_empty_block", "thinking", "non_thinking"} <= set(report)
    rates = report["thinking"]["per_problem"]  # per-problem pass rates, for the report's paired comparisons
    assert len(rates) == 4 and sum(rates) / 4 == pytest.approx(report["thinking"]["pass_at_1"]) and report["problems"]
    for stage in ("cold", "rl", "fusion", "rm", "general"):
        load(latest_checkpoint(str(out / stage)), device="cpu")


def test_eval_measures_think_follow_on_a_model_that_never_thinks(tiny, tmp_path):
    """A scripted model that answers every prompt with an empty think block and "5": it follows exactly the
    ThinkFollow cases that ask for no thinking, and its /no_think answers all have the empty block."""
    from nanoqwen.checkpoint import save_model
    from test_engine import chain, scripted_model
    _, tokenizer = load(tiny, device="cpu")
    newline, five = tokenizer.encode("\n")[0], tokenizer.encode("5")[0]
    script = chain(newline, tokenizer.think_start_id, tokenizer.think_end_id, five, tokenizer.eos_token_id)
    path = str(tmp_path / "never_thinks")
    save_model(scripted_model(script, vocab_size=512), path)
    tokenizer.save(path)
    task = dict(tasks=["lists"], difficulty=1, languages=["en"])
    measured = evaluate.evaluate(path, n=12, k=1, budgets=[], max_new_tokens=8, **task)
    cases = evaluate.think_follow_prompts(sample_examples(12, "test", 0, **task), 0)
    wants = [want for _, want in cases]
    assert True in wants and False in wants  # both kinds asked for, so the measure can tell them apart
    assert measured["think_follow"] == pytest.approx(wants.count(False) / len(wants))
    assert measured["no_think_empty_block"] == 1.0
    assert measured["thinking"]["mean_thinking_tokens"] == 2.0  # <think></think>: the block's two tags


def test_learnable_keeps_queries_solved_sometimes(tiny, monkeypatch, capsys):
    records = posttrain.rl_prompts(6, tasks=["lists"], difficulty=(1, 1), languages=["en"])
    rates = iter([0.0, 0.25, 1.0, 0.5, 0.0, 0.75])  # what 4 samples per query verified
    monkeypatch.setattr(posttrain, "solves", lambda model, tok, recs, **kw: [next(rates) for _ in recs])
    kept = posttrain.learnable(tiny, records, samples=4)
    assert kept == [records[1], records[3], records[5]]
    assert "3 of 6 queries are learnable" in capsys.readouterr().out
    # unpatched, through the engine: a random model solves nothing, so nothing is learnable
    monkeypatch.undo()
    assert posttrain.learnable(tiny, records[:2], samples=2, max_new_tokens=8) == []


def test_resampling_replaces_groups_without_a_reward_spread(tiny, tmp_path, monkeypatch):
    model, tokenizer = load(tiny, device="cpu")
    prompts = posttrain.rl_prompts(8, tasks=["lists"], difficulty=(1, 1), languages=["en"])
    solved = {id(r): i in (2, 5) for i, r in enumerate(prompts)}  # two queries verify half the time; the rest never
    calls = iter(range(10_000))
    monkeypatch.setattr("nanoqwen.train.rewards.score",
                        lambda record, text, *a: (float(solved[id(record)] and next(calls) % 2), 0.0))
    config = GRPOConfig(prompts_per_step=2, group_size=2, micro_batch=4, iterations=1, max_new_tokens=4, resample=3)
    grpo = GRPO(model, tokenizer, prompts, config, str(tmp_path))
    batch = grpo.rollout()[0]
    assert grpo.position == 6 and grpo.pending["learnable"] == 1.0  # rounds of 2 prompts until two groups spread
    assert sorted(batch["advantages"].tolist()) == pytest.approx([-1, -1, 1, 1], abs=1e-3)
    assert "old_logp" not in batch  # one pass over each rollout: the sampling policy is the current one
    grpo = GRPO(model, tokenizer, prompts, GRPOConfig(**(vars(config) | dict(resample=0))), str(tmp_path))
    assert grpo.rollout()[0]["advantages"].abs().sum() == 0 and grpo.position == 2  # without: the first two, flat


def test_paired_comparison_on_the_same_problems():
    before = [0.5] * 100
    after = [0.5 + (0.1 if i % 2 else 0.0) for i in range(100)]  # +0.05 on average, every problem at least as good
    assert "within noise" in report._compare(0.5, 0.55, 400)  # unpaired: 2 SE of two rates over 400 answers, 0.07
    paired = report._compare(0.5, 0.55, 400, (before, after))
    assert "**reproduced** (paired" in paired  # 2 SE of the mean difference: 0.01
    swings = [1.0 if i % 2 else 0.1 for i in range(100)]  # the same mean, but problems move both ways
    assert "within noise (paired" in report._compare(0.5, 0.55, 400, (before, swings)).replace("**", "")
    a = dict(problems="x", thinking=dict(per_problem=before), non_thinking=dict(per_problem=after))
    assert report._pairs(a, dict(a, thinking=dict(per_problem=after))) == (before, after)
    assert report._pairs(a, a, "non_thinking") == (after, before)
    assert report._pairs(a, dict(a, problems="y")) is None and report._pairs(a, dict(problems="x", thinking={})) is None
