"""GRPO (post-training stages 2 and 4) on the shared Trainer: the rollout batch is the Trainer's data source, the
clipped-ratio objective its loss function.

One RL step: take P prompts, sample a group of G answers each through the engine (batched), score them
(rewards.score), turn the rewards into group-normalised advantages, record the sampling policy's token log-probs,
then run `iterations` optimizer steps over that batch (the Trainer counts those). With `resample` R, groups whose
answers all score the same (zero advantage) are replaced by those of up to R further rounds of P fresh prompts (DAPO's
dynamic sampling). Log-probs are taken at the sampling temperature (softmax(logits / T)): the policy that drew the
tokens. The loss:

    ratio_t   = exp(logp_t - old_logp_t)                       per response token t
    loss_t    = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)  [+ kl_coef * KL_t to a reference]
    loss      = sum_t loss_t / number of response tokens       token-level: long answers weigh by their length

Compute: the rollouts (prompt + sampled tokens), the no-grad forwards (old log-probs, the reference) and every
optimizer step's forward + backward are counted in metrics.jsonl and OUT/compute.json (trainer.Compute), so RL and
distillation compare per FLOP. Judge and reward-model forwards (stage 4) are not counted.

Prompts: JSONL, one a line: {"messages": [...], "verifier": "arithmetic", "answer": "55", "meta": {...},
"reward": "verifier" | "rule" | "judge" | "rm" | "code", "constraints": [...], "tests": [[stdin, stdout], ...]}
(see rewards.py; rewards.check_record vets each line as it is read).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from ..generation.api import encode_prompt, generate_batch
from . import rewards
from .options import POSITIVE, RunOptions, TaskOptions, model_lr, option
from .sft import pad_batch
from .trainer import Compute, MeteredTrainer


@dataclass
class GRPOConfig:
    prompts_per_step: int = option(8, "prompts per RL step", check=POSITIVE)
    group_size: int = option(8, "G answers per prompt", check=POSITIVE)
    iterations: int = option(2, "optimizer steps per rollout batch (>1 makes the ratio and its clipping matter)",
                             check=POSITIVE)
    micro_batch: int = option(16, "rows per forward/backward", check=POSITIVE)
    clip_low: float = option(0.2, "the ratio is clipped to [1 - clip_low, 1 + clip_high]")
    clip_high: float = option(0.28, "DAPO's clip-higher; 0.2 is symmetric PPO clipping")
    kl_coef: float = option(0.0, "KL to the reference (the starting weights); off by default, as in the report")
    eps: float = option(1e-4, "in (r - mean) / (std + eps)", cli=False)
    max_new_tokens: int = option(256, "longest answer", check=POSITIVE)
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout top-p", cli=False)
    top_k: int = option(0, "rollout top-k (0: off)", cli=False)
    resample: int = option(0, "up to R extra sampling rounds per step to replace groups whose rewards are all equal "
                              "(DAPO's dynamic sampling)", metavar="R")
    format_weight: float = option(0.2, "reward bonus for a well-formed think block", cli=False)
    seed: int = 0


def group_advantages(rewards_: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group (rows of a P x G tensor); population std."""
    mean, std = rewards_.mean(dim=1, keepdim=True), rewards_.std(dim=1, correction=0, keepdim=True)
    return (rewards_ - mean) / (std + eps)


def grpo_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, ref_logp=None, kl_coef=0.0):
    """Clipped-ratio policy loss over response tokens (mask 1), normalised by the token count; and its stats.
    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,)."""
    advantage = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef > 0:  # k3 estimator of KL(pi || ref): exp(d) - d - 1, d = ref - logp
        delta = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)
    tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / tokens
    clip_fraction = ((clipped < unclipped).float() * mask).sum() / tokens
    return loss, dict(clip_fraction=clip_fraction.item())


def _has_spread(group: tuple) -> bool:
    """A (record, answers, rewards) group whose rewards are not all equal: its advantages are not all zero."""
    return len(set(group[2])) > 1


def token_logprobs(model, input_ids: torch.Tensor, with_entropy: bool = False, temperature: float = 1.0):
    """log p(token t+1 | tokens <= t) for every position: (B, T-1); and the entropy per position. temperature: that
    of the sampler, so the log-probs are those of the policy the tokens were drawn from (softmax(logits / T))."""
    logits = model(input_ids).logits[:, :-1].float() / (temperature if temperature > 0 else 1.0)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return chosen, entropy


class GRPO:
    """Rollout source and loss for the Trainer: Trainer(model, cfg, grpo, loss_fn=grpo.loss, ...)."""

    def __init__(self, model, tokenizer, prompts: list[dict], config: GRPOConfig, out_dir: str, reference=None,
                 judge=None, reward_model=None, compute: Compute | None = None):
        self.model, self.tokenizer, self.prompts, self.c = model, tokenizer, prompts, config
        self.compute = compute or Compute()
        self.reference, self.judge, self.reward_model, self.out_dir = reference, judge, reward_model, out_dir
        self.queue, self.step, self.position, self.pending, self.loss_stats = [], 0, 0, None, []
        rows = config.prompts_per_step * config.group_size
        self.micro_batch = min(config.micro_batch, rows)
        if rows % self.micro_batch:
            raise ValueError(f"prompts_per_step x group_size ({rows}) must be a multiple of micro_batch")
        self.grad_accum = rows // self.micro_batch

    def state_dict(self) -> dict:
        return dict(step=self.step, position=self.position)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.position = state["step"], state["position"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.queue:
            self.queue = self.rollout()
        return self.queue.pop(0)

    @torch.no_grad()
    def rollout(self) -> list[dict]:
        """Sample, score, normalise; the micro-batches of all `iterations` passes. With `resample` rounds, groups
        whose rewards are all equal (no advantage, nothing to learn) are replaced by the groups of further prompts
        (DAPO's dynamic sampling: the report's learnable queries, chosen online under the current policy)."""
        self.log_previous()
        c, model, device = self.c, self.model, self.model.lm_head.weight.device
        was_training, t0 = model.training, time.perf_counter()
        model.eval()
        groups, sampled, correct = [], [], []  # groups: (record, answers, rewards); sampled, correct: every answer
        for _ in range(c.resample + 1):
            records = [self.prompts[(self.position + i) % len(self.prompts)] for i in range(c.prompts_per_step)]
            prompts = [r["messages"] for r in records for _ in range(c.group_size)]
            results = generate_batch(model, self.tokenizer, prompts, max_new_tokens=c.max_new_tokens,
                                     temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                     seed=c.seed * 1_000_003 + self.position * c.group_size)
            self.position += c.prompts_per_step
            self.compute.generate(model.config, [r.prompt_tokens for r in results],
                                  [r.completion_tokens for r in results])
            for i, record in enumerate(records):
                answers = results[i * c.group_size:(i + 1) * c.group_size]
                scored = [rewards.score(record, r.text, self.judge, self.reward_model, self.tokenizer,
                                        c.format_weight) for r in answers]
                groups.append((record, answers, [s[0] for s in scored]))
                sampled += answers
                correct += [s[1] for s in scored]
            if sum(map(_has_spread, groups)) >= c.prompts_per_step:
                break
        groups = sorted(groups, key=lambda g: not _has_spread(g))[:c.prompts_per_step]  # those with a spread first
        generate_s = time.perf_counter() - t0
        reward = torch.tensor([g[2] for g in groups], dtype=torch.float32)
        advantages = group_advantages(reward, c.eps).flatten()
        prompts = [record["messages"] for record, answers, _ in groups for _ in answers]
        results = [r for _, answers, _ in groups for r in answers]
        rows = []
        for prompt, result in zip(prompts, results):
            ids = encode_prompt(self.tokenizer, prompt) + result.token_ids
            rows.append((ids, [-100] * (len(ids) - len(result.token_ids)) + result.token_ids))
        batches = []
        for start in range(0, len(rows), self.micro_batch):
            batch = pad_batch(rows[start:start + self.micro_batch], self.tokenizer.pad_token_id)
            batch["advantages"] = advantages[start:start + self.micro_batch]
            if c.iterations > 1:  # one pass: the policy is the sampler, the ratio is 1 (old log-probs = logp.detach())
                batch["old_logp"] = token_logprobs(model, batch["input_ids"].to(device), False, c.temperature)[0].cpu()
                self.compute.score(model.config, [batch["input_ids"].shape])
            if self.reference is not None and c.kl_coef > 0:
                batch["ref_logp"] = token_logprobs(self.reference, batch["input_ids"].to(device), False,
                                                   c.temperature)[0].cpu()
                self.compute.score(self.reference.config, [batch["input_ids"].shape])
            batches.append(batch)
        model.train(was_training)
        self.step += 1
        self.pending = dict(rl_step=self.step, step=self.step * c.iterations,  # the optimizer step it ends at
                            reward=reward.mean().item(), accuracy=sum(correct) / len(correct),
                            response_length=sum(r.completion_tokens for r in sampled) / len(sampled),
                            truncated=sum(r.finish_reason == "length" for r in sampled) / len(sampled),
                            learnable=sum(map(_has_spread, groups)) / len(groups),
                            generate_s=generate_s, gen_tok_per_s=sum(r.completion_tokens for r in sampled) / generate_s,
                            train_start=t0 + generate_s)  # scoring, old log-probs and optimizer steps
        return batches * c.iterations

    def loss(self, model, batch: dict, expert_counter=None):
        """The Trainer's loss_fn: GRPO loss of one micro-batch and its response-token count."""
        mask = (batch["labels"][:, 1:] != -100).float()
        logp, entropy = token_logprobs(model, batch["input_ids"], True, self.c.temperature)
        old_logp = batch["old_logp"] if "old_logp" in batch else logp.detach()
        loss, stats = grpo_loss(logp, old_logp, batch["advantages"], mask, self.c.clip_low,
                                self.c.clip_high, batch.get("ref_logp"), self.c.kl_coef)
        stats["entropy"] = ((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)).item()
        self.loss_stats.append(stats)
        return loss, mask.sum()

    def log_previous(self) -> None:
        """One line and one rl_metrics.jsonl record per RL step (written once its optimizer steps are done)."""
        if self.pending is None:
            return
        r, stats = self.pending, self.loss_stats
        r["train_s"] = time.perf_counter() - r.pop("train_start")
        r["entropy"] = sum(s["entropy"] for s in stats) / max(1, len(stats))
        r["clip_fraction"] = sum(s["clip_fraction"] for s in stats) / max(1, len(stats))
        r["total_flops"] = self.compute.totals["flops"]  # through this RL step's optimizer steps
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "rl_metrics.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"rl step {r['rl_step']:4d} | reward {r['reward']:.3f} | accuracy {r['accuracy']:.3f} | length "
              f"{r['response_length']:.0f} | learnable {r['learnable']:.2f} | entropy {r['entropy']:.3f} | clip frac "
              f"{r['clip_fraction']:.3f} | gen {r['generate_s']:.1f}s ({r['gen_tok_per_s']:,.0f} tok/s) train "
              f"{r['train_s']:.1f}s", flush=True)
        self.pending, self.loss_stats = None, []


def run_grpo(model, tokenizer, prompts: list[dict], out: str, steps: int, config: GRPOConfig, lr: float | None,
             reference=None, judge=None, reward_model=None, device=None, **train_options) -> str:
    """`steps` RL steps (each `iterations` optimizer steps) from `model`; returns the final checkpoint folder."""
    from ..checkpoint import latest_checkpoint
    from .trainer import TrainConfig
    lr = model_lr(lr, model.config, nano=1e-4, released=1e-6)
    compute = Compute(out)
    grpo = GRPO(model, tokenizer, prompts, config, out, reference, judge, reward_model, compute)
    train = TrainConfig(out_dir=out, steps=steps * config.iterations, batch_size=grpo.micro_batch,
                        grad_accum=grpo.grad_accum, lr=lr, schedule="wsd", decay_fraction=0.0, min_lr_ratio=1.0,
                        weight_decay=0.0, seed=config.seed,
                        **({"progress": False, "log_every": config.iterations} | train_options))
    print(f"grpo: {len(prompts)} prompts, {steps} steps x {config.prompts_per_step} prompts x G={config.group_size}, "
          f"{config.iterations} iterations, clip [{1 - config.clip_low:.2f}, {1 + config.clip_high:.2f}], "
          f"kl {config.kl_coef}, lr {lr:.1e}")
    trainer = MeteredTrainer(model, train, grpo, loss_fn=grpo.loss, tokenizer=tokenizer, device=device,
                             compute=compute)
    grpo.model = trainer.raw_model
    trainer.train()
    grpo.log_previous()
    return latest_checkpoint(out)


@dataclass(kw_only=True)
class RLOptions(RunOptions, TaskOptions, GRPOConfig):
    stage: str = option(help="reasoning (verifier + format rewards) or general (rule, judge and reward-model "
                             "rewards)", choices=["reasoning", "general"])
    model: str = option(help="checkpoint folder, or a run folder with a `latest` file")
    prompts: str | None = option(None, "RL prompts JSONL (messages, verifier, answer); default: tasks")
    judge: str | None = option(None, "judge checkpoint for the model-based reward with a reference")
    rm: str | None = option(None, "reward model checkpoint (nanoqwen rm) for the reward without one")
    steps: int = option(20, "RL steps (each `iterations` optimizer steps)", check=POSITIVE)
    lr: float | None = option(None, "learning rate (default: 1e-4 for the nano presets, 1e-6 for released shapes)",
                              type=float)
    learnable: int = option(0, "reasoning: keep generated queries the model solves in 1..K-1 of K samples "
                               "(0: keep all)", metavar="K")
    max_flops: float | None = option(None, "stop once the run has spent this many FLOPs (compute-matched "
                                           "comparisons; the LR is constant, so an early stop changes nothing else)",
                                     type=float)
    on_bad_line: str = option("skip", "malformed JSONL lines", choices=["skip", "error"])
    unsafe_code_execution: bool = option(False, 'run "reward": "code" programs even where the OS sandbox cannot be '
                                                "built (rlimits only, under a repeated warning); see docs/sandbox.md")


def rl_prompts_for(o: RLOptions, judge, reward_model) -> list[dict]:
    """The stage's prompts: the file (checked line by line), or task prompts, for reasoning RL narrowed to the
    learnable ones when --learnable is set."""
    from ..checkpoint import resolve
    from . import posttrain
    from .sft import read_jsonl
    if o.prompts:
        prompts = read_jsonl(o.prompts, rewards.check_record, o.on_bad_line)
        for kind, given, flag in (("judge", judge, "--judge CHECKPOINT"), ("rm", reward_model, "--rm CHECKPOINT")):
            if given is None and any(r.get("reward") == kind for r in prompts):
                raise ValueError(f'{o.prompts}: prompts with "reward": "{kind}" need {flag}')
        if not prompts:
            raise ValueError(f"{o.prompts}: no usable prompts")
        if any(r.get("reward") == "code" for r in prompts):  # model-written code runs only where it can be isolated
            from .sandbox import require_isolation
            require_isolation(unsafe=o.unsafe_code_execution)
        return prompts
    if o.stage == "general":
        prompts = posttrain.general_prompts(o.samples, o.seed + 2, judge is not None, reward_model is not None,
                                            **o.task_filter())
    else:
        prompts = posttrain.rl_prompts(o.samples, o.seed + 1, **o.task_filter())
        if o.learnable:
            kept = posttrain.learnable(resolve(o.model), prompts, o.learnable, o.max_new_tokens, o.seed,
                                       device=o.device, temperature=o.temperature)
            if len(kept) < o.prompts_per_step:
                print(f"rl: only {len(kept)} learnable queries, fewer than --prompts-per-step "
                      f"{o.prompts_per_step}: training on all {len(prompts)} (raise --samples to select)")
            else:
                prompts = kept
    print(f"prompts: {posttrain.write_jsonl(prompts, os.path.join(o.out, f'{o.stage}_prompts.jsonl'))}")
    return prompts


def run(o: RLOptions) -> str:
    """An RL stage from its options: the policy (and judge, reward model, reference), the prompts, then GRPO."""
    from dataclasses import fields
    from ..checkpoint import resolve
    from ..checkpoint import load
    from .reward_model import RewardModel
    model, tokenizer = load(resolve(o.model), dtype=torch.float32, device="cpu")  # the Trainer moves it
    judge = load(resolve(o.judge), device=o.device)[0] if o.judge else None
    reward_model = RewardModel(resolve(o.rm), device=o.device) if o.rm else None
    prompts = rl_prompts_for(o, judge, reward_model)
    reference = load(resolve(o.model), device=o.device)[0] if o.kl_coef > 0 else None
    config = GRPOConfig(**{f.name: getattr(o, f.name) for f in fields(GRPOConfig)})
    return run_grpo(model, tokenizer, prompts, o.out, o.steps, config, lr=o.lr, reference=reference, judge=judge,
                    reward_model=reward_model, device=o.device, log_every=o.log_every, progress=o.progress,
                    save_every=o.save_every, max_flops=o.max_flops)
