"""Strong-to-weak distillation (Qwen3 report, section 4.5) on the shared Trainer: a large teacher trains a small
student that shares its tokenizer, in two ways.

Off-policy: the teacher answers every prompt in both modes, /think (a think block, then the answer) and /no_think
(the empty think block, then the answer); the answers are kept as OpenAI-format conversations (OUT/distill_off.jsonl)
and the student is fine-tuned on them by the SFT path (loss on what the assistant writes only).

On-policy: each step the student samples answers through the engine (each prompt in thinking mode with probability
think_fraction, else in non-thinking mode), the teacher scores the same tokens (one forward over prompt + answer), and
the student minimises a divergence between its next-token distribution q and the teacher's p at every answer position
(never a prompt position), averaged over the answer tokens of the batch:

    reverse KL (default)  KL(q || p) = sum_v q_v (log q_v - log p_v)     mode-seeking: what the student says, corrected
    forward KL            KL(p || q) = sum_v p_v (log p_v - log q_v)     mass-covering: everything the teacher says
    jsd, 0 < beta < 1     beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (generalised JSD)
                          JSD / beta -> forward KL as beta -> 0; JSD / (1 - beta) -> reverse KL as beta -> 1

p and q are softmaxes over the tokenizer's vocabulary: embedding rows past it (vocab_size rounded up) are padding, are
never sampled, and are left out. With top_k = k > 0 both distributions are restricted to S, the teacher's k most
likely tokens at that position, and renormalised there: p~_v = p_v / sum_{u in S} p_u and q~_v = q_v / sum_{u in S}
q_u for v in S; the divergence is taken between p~ and q~ (so student mass outside S is not penalised).

Both modes record compute (tokens and FLOPs of generation, teacher scoring and student training) in metrics.jsonl and
OUT/compute.json, under the keys GRPO and SFT use (trainer.Compute), for comparisons per unit of compute (Table 21).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import torch

from ..checkpoint import latest_checkpoint, load, load_model, resolve, save_model
from ..config import get_preset, padded_vocab_size
from ..generation.api import encode_prompt, generate_batch
from . import rewards
from .posttrain import write_jsonl
from .options import AT_LEAST_0, POSITIVE, UNIT, RunOptions, TaskOptions, model_lr, option
from .sft import pad_batch, run_sft
from .trainer import Compute, MeteredTrainer, TrainConfig

DIVERGENCES = ("reverse", "forward", "jsd")
PROBE = "Hello, world! 你好，世界 Réponse : 1,234 + 5 = 1239\n\n\tdef f(x): return x ** 2"


# --- divergences -------------------------------------------------------------------------------------------------

def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) along the last dimension, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def check_divergence(kind: str, beta: float = 0.5, top_k: int = 0) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (its limits are --divergence forward and reverse), got {beta}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: the whole vocabulary), got {top_k}")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse",
                     beta: float = 0.5, top_k: int = 0) -> torch.Tensor:
    """Divergence between the teacher's and the student's next-token distributions, one per row: logits (..., V)
    in, (...) out, computed in fp32 (see the module docstring for the definitions)."""
    check_divergence(kind, beta, top_k)
    student, teacher = student_logits.float(), teacher_logits.float()
    if top_k:
        teacher, top = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
        student = student.gather(-1, top)
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    if kind == "reverse":
        return _kl(log_q, log_p)
    if kind == "forward":
        return _kl(log_p, log_q)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 vocab_size: int | None = None, kind: str = "reverse", beta: float = 0.5, top_k: int = 0):
    """Mean token divergence over the positions where mask is true (the answer positions); logits (B, T, V) of the
    two models on the same tokens, mask (B, T). Only the first vocab_size logits (the tokenizer's) count."""
    vocab = slice(0, vocab_size)
    per_token = token_divergence(student_logits[mask][:, vocab], teacher_logits[mask][:, vocab], kind, beta, top_k)
    return per_token.sum() / mask.sum().clamp(min=1)


# --- teacher and student ------------------------------------------------------------------------------------------

def check_same_tokenizer(teacher_tok, student_tok, teacher: str, student: str) -> None:
    """Distillation compares two distributions id by id: both checkpoints must use one tokenizer. Compares the
    vocabulary size, the special tokens and their ids, and the ids of a probe text and chat; one error names both."""
    problem = None
    if teacher_tok.vocab_size != student_tok.vocab_size:
        problem = f"vocabulary sizes differ ({teacher_tok.vocab_size:,} vs {student_tok.vocab_size:,})"
    elif teacher_tok.special_tokens != student_tok.special_tokens:
        name = sorted(set(teacher_tok.special_tokens.items()) ^ set(student_tok.special_tokens.items()))[0][0]
        problem = f"special token {name} differs (id {teacher_tok.special_tokens.get(name)} vs " \
                  f"{student_tok.special_tokens.get(name)})"
    else:
        chat = [{"role": "user", "content": PROBE}]
        for what, encode in (("a probe text", lambda t: t.encode(PROBE)),
                             ("a probe chat", lambda t: t.apply_chat_template(chat, add_generation_prompt=True))):
            if encode(teacher_tok) != encode(student_tok):
                problem = f"they encode {what} differently"
                break
    if problem:
        raise ValueError(f"teacher {teacher} and student {student} do not share a tokenizer: {problem}. Distillation "
                         f"compares next-token distributions id by id; start the student from a preset "
                         f"(--student nano-d4) to give it the teacher's tokenizer")


def prepare_student(student: str, teacher: str, teacher_tok, out: str, seed: int = 0) -> str:
    """The student's checkpoint folder: a checkpoint (or run folder) that shares the teacher's tokenizer, or a preset
    name: a fresh model of that shape with the teacher's tokenizer, saved to OUT/student_init. Small presets get
    vocab_size = the tokenizer's rounded up to a multiple of 64 (as pretrain.py)."""
    path = resolve(student)
    if os.path.isdir(path):
        model, tokenizer = load(path, device="cpu")
        check_same_tokenizer(teacher_tok, tokenizer, teacher, path)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"student {path}: {model.config.vocab_size} embedding rows for a "
                             f"{tokenizer.vocab_size}-token tokenizer")
        return path
    if "/" in student or student.startswith("."):
        raise FileNotFoundError(f"student {student}: no checkpoint folder there (and it is not a preset name)")
    vocab = get_preset(student).vocab_size
    if student.startswith("nano") or vocab < teacher_tok.vocab_size:
        vocab = padded_vocab_size(teacher_tok.vocab_size)
    torch.manual_seed(seed)
    model = load_model(student, vocab_size=vocab)
    path = os.path.join(out, "student_init")
    save_model(model, path)
    teacher_tok.save(path)
    print(f"student: a fresh {student} ({model.config.num_parameters():,} parameters) with the teacher's "
          f"tokenizer at {path}")
    return path


def with_mode(messages: list[dict], think: bool) -> tuple[list[dict], bool | None]:
    """The prompt in one mode: the soft switch appended to the last user turn, and the template's hard switch
    (enable_thinking=False writes the empty think block) so that a teacher that ignores the flag still obeys."""
    messages = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = f"{messages[last].get('content') or ''} {'/think' if think else '/no_think'}"
    return messages, None if think else False


# --- off-policy ---------------------------------------------------------------------------------------------------

def teacher_conversations(teacher, tokenizer, prompts: list[dict], max_new_tokens: int = 256,
                          temperature: float | None = None, seed: int = 0, compute: Compute | None = None,
                          batch_size: int = 64) -> list[dict]:
    """The teacher's answer to every prompt in both modes, as conversations. Kept: answers that ended (not cut at
    max_new_tokens); in /think mode with one well-formed, non-empty think block; in /no_think mode with no think tag.
    The /no_think reply has reasoning_content "", which the template renders as the empty think block."""
    asks = [(record, think) for record in prompts for think in (True, False)]
    modes = [with_mode(record["messages"], think) for record, think in asks]
    ids = [encode_prompt(tokenizer, messages, enable_thinking) for messages, enable_thinking in modes]
    results = generate_batch(teacher, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed, batch_size=batch_size, progress="teacher answers")
    if compute is not None:
        compute.generate(teacher.config, [len(i) for i in ids], [r.completion_tokens for r in results])
    data = []
    for (record, think), (messages, _), result in zip(asks, modes, results):
        well_formed = rewards.format_reward(result.text) if think else \
            "<think>" not in result.text and "</think>" not in result.text and result.content
        if result.finish_reason == "stop" and well_formed:
            reply = {"role": "assistant", "reasoning_content": result.reasoning_content if think else "",
                     "content": result.content}
            data.append(dict(messages=messages + [reply], mode="think" if think else "no_think"))
    kept = {mode: sum(d["mode"] == mode for d in data) for mode in ("think", "no_think")}
    print(f"distill: the teacher answered {len(prompts)} prompts in both modes; kept {kept['think']} thinking and "
          f"{kept['no_think']} non-thinking answers (finished and well formed)")
    return data


def run_off_policy(teacher_path: str, student: str, prompts: list[dict], out: str, steps: int, batch_size: int,
                   lr: float | None, max_new_tokens: int, temperature: float | None, max_len: int, seed: int = 0,
                   device=None, **train_options) -> str:
    """Teacher answers in both modes -> OUT/distill_off.jsonl -> SFT of the student; returns its final checkpoint."""
    teacher_path = resolve(teacher_path)
    teacher, tokenizer = load(teacher_path, device=device)
    student_path = prepare_student(student, teacher_path, tokenizer, out, seed)
    compute = Compute(out)
    records = teacher_conversations(teacher, tokenizer, prompts, max_new_tokens, temperature, seed, compute)
    del teacher
    if not records:
        raise ValueError(f"the teacher {teacher_path} finished no well-formed answer within {max_new_tokens} tokens; "
                         f"raise --max-new-tokens")
    print(f"data: {write_jsonl(records, os.path.join(out, 'distill_off.jsonl'))}")
    return run_sft(student_path, records, out, steps=steps, batch_size=batch_size, lr=lr, max_len=max_len, seed=seed,
                   device=device, compute=compute, **train_options)


# --- on-policy ----------------------------------------------------------------------------------------------------

@dataclass
class DistillConfig:
    divergence: str = option("reverse", "on-policy loss", choices=list(DIVERGENCES))
    beta: float = option(0.5, "jsd: the mixture weight of the teacher (-> 0: forward KL, -> 1: reverse KL)",
                         check=(lambda v: 0 < v < 1, "in (0, 1)"))
    top_k: int = option(0, "on-policy: compare over the teacher's top k tokens, renormalised (0: the whole "
                           "vocabulary)", check=AT_LEAST_0)
    max_new_tokens: int = option(256, "longest answer (teacher and student)", check=POSITIVE)
    temperature: float | None = option(None, "sampling temperature (default: Qwen's recommendation for each mode)",
                                       type=float, check=AT_LEAST_0)
    think_fraction: float = option(0.5, "on-policy: share of prompts the student answers in thinking mode",
                                   check=UNIT)
    seed: int = 0


class OnPolicy:
    """Data source and loss for the Trainer: each batch is answers the student samples now; the loss is the
    divergence to the teacher on their tokens. Trainer(student, cfg, source, loss_fn=source.loss)."""

    def __init__(self, student, teacher, tokenizer, prompts: list[dict], batch_size: int, config: DistillConfig,
                 compute: Compute | None = None):
        check_divergence(config.divergence, config.beta, config.top_k)
        self.student, self.teacher, self.tokenizer, self.prompts = student, teacher, tokenizer, prompts
        self.batch_size, self.c, self.compute = batch_size, config, compute or Compute()
        self.step = 0

    def __iter__(self):
        while True:
            yield self.sample()

    @torch.no_grad()
    def sample(self) -> dict:
        """Sample one answer per prompt from the student as it is now; labels mark the answer tokens."""
        c, rng = self.c, random.Random(f"{self.c.seed}/{self.step}")
        first = self.step * self.batch_size
        records = [self.prompts[(first + i) % len(self.prompts)] for i in range(self.batch_size)]
        prompts = [encode_prompt(self.tokenizer, *with_mode(r["messages"], rng.random() < c.think_fraction))
                   for r in records]
        was_training = self.student.training
        self.student.eval()
        results = generate_batch(self.student, self.tokenizer, prompts, max_new_tokens=c.max_new_tokens,
                                 temperature=c.temperature, seed=c.seed * 1_000_003 + self.step * len(prompts))
        self.student.train(was_training)
        self.compute.generate(self.student.config, [len(p) for p in prompts], [r.completion_tokens for r in results])
        self.step += 1
        rows = [(p + r.token_ids, [-100] * len(p) + r.token_ids) for p, r in zip(prompts, results)]
        return pad_batch(rows, self.tokenizer.pad_token_id)

    def loss(self, model, batch: dict, expert_counter=None):
        """The Trainer's loss_fn: mean divergence over the answer tokens, and their count."""
        ids = batch["input_ids"]
        mask = batch["labels"][:, 1:] != -100  # position t predicts token t + 1: an answer token
        student = model(ids).logits[:, :-1]
        with torch.no_grad():
            teacher = self.teacher(ids).logits[:, :-1]
        self.compute.score(self.teacher.config, [tuple(ids.shape)])
        c = self.c
        return distill_loss(student, teacher, mask, self.tokenizer.vocab_size, c.divergence, c.beta, c.top_k), mask.sum()


def run_on_policy(teacher_path: str, student: str, prompts: list[dict], out: str, steps: int, batch_size: int,
                  lr: float | None, config: DistillConfig, device=None, **train_options) -> str:
    """`steps` on-policy steps (sample, score, one optimizer step each); returns the final checkpoint folder."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_path = resolve(teacher_path)
    teacher, tokenizer = load(teacher_path, device=device)
    student_path = prepare_student(student, teacher_path, tokenizer, out, config.seed)
    model = load(student_path, dtype=torch.float32, device="cpu")[0]
    lr = model_lr(lr, model.config, nano=1e-4, released=1e-6)
    compute = Compute(out)
    source = OnPolicy(model, teacher.eval().requires_grad_(False), tokenizer, prompts, batch_size, config, compute)
    train = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                        schedule="wsd", decay_fraction=0.0, min_lr_ratio=1.0, weight_decay=0.0, seed=config.seed,
                        **train_options)
    print(f"distill on-policy: {len(prompts)} prompts, {steps} steps of {batch_size} answers sampled by the student "
          f"({config.think_fraction:.0%} thinking), {config.divergence}"
          + (f" (beta {config.beta})" if config.divergence == "jsd" else "")
          + (f" over the teacher's top {config.top_k}" if config.top_k else " over the whole vocabulary")
          + f", lr {lr:.1e}")
    trainer = MeteredTrainer(model, train, source, loss_fn=source.loss, tokenizer=tokenizer, device=device,
                             compute=compute)
    source.student = trainer.raw_model
    trainer.train()
    return latest_checkpoint(out)


@dataclass(kw_only=True)
class DistillOptions(RunOptions, TaskOptions, DistillConfig):
    mode: str = option(help="off: SFT on the teacher's answers in both modes; on: the student samples, KL to the "
                            "teacher", choices=["off", "on"])
    teacher: str = option(help="teacher checkpoint (or run folder)")
    student: str = option(help="student checkpoint sharing the teacher's tokenizer, or a preset name (a fresh model "
                               "with the teacher's tokenizer)")
    prompts: str | None = option(None, "prompts JSONL (a 'messages' list each); default: task prompts")
    samples: int = option(256, "generated prompts (when no prompts file is given)", check=POSITIVE)
    steps: int = option(100, "optimizer steps", check=POSITIVE)
    batch_size: int = option(8, "off: conversations per step; on: answers sampled per step", check=POSITIVE)
    lr: float | None = option(None, "learning rate (default off: 1e-3, on: 1e-4 for the nano presets; 2e-5 and 1e-6 "
                                    "for released shapes)", type=float)
    max_len: int = option(1024, "off-policy: SFT truncation length", check=POSITIVE)
    on_bad_line: str = option("skip", "malformed JSONL lines", choices=["skip", "error"])


def run(o: DistillOptions) -> str:
    """A distillation stage from its options: the prompts (the file, or task prompts written to OUT), then the
    off-policy or on-policy run."""
    from dataclasses import fields
    from . import posttrain
    from .rewards import check_messages
    from .sft import read_jsonl
    if o.prompts:
        prompts = read_jsonl(o.prompts, check_messages, o.on_bad_line)
    else:
        prompts = posttrain.rl_prompts(o.samples, o.seed + 1, **o.task_filter())
        print(f"prompts: {write_jsonl(prompts, os.path.join(o.out, 'distill_prompts.jsonl'))}")
    if not prompts:
        raise ValueError("no prompts to distill on")
    train = dict(device=o.device, log_every=o.log_every, progress=o.progress, save_every=o.save_every)
    if o.mode == "off":
        return run_off_policy(o.teacher, o.student, prompts, o.out, o.steps, o.batch_size, o.lr, o.max_new_tokens,
                              o.temperature, o.max_len, o.seed, **train)
    config = DistillConfig(**{f.name: getattr(o, f.name) for f in fields(DistillConfig)})
    return run_on_policy(o.teacher, o.student, prompts, o.out, o.steps, o.batch_size, o.lr, config, **train)
