"""A reward model without a reference: a Qwen3 trunk with a scalar head, trained on preference pairs with the
Bradley-Terry loss  -log sigmoid(score(chosen) - score(rejected)).

The scalar head is one row of the output projection: score = h_last . w[REWARD_TOKEN], where REWARD_TOKEN is a
reserved token the chat never uses. So a reward model is an ordinary Qwen3 checkpoint (HF layout, loads with
`load`) and trains on the shared Trainer unchanged. h_last is the final hidden state at the last response token.

Pairs: JSONL {"messages": [prompt turns], "chosen": "<think>...</think>\\n\\nAnswer: 5", "rejected": "..."}.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint import latest_checkpoint, load
from ..generation.api import encode_prompt
from .options import POSITIVE, RunOptions, TaskOptions, model_lr, option
from .sft import read_jsonl
from .trainer import Compute, MeteredTrainer, TrainConfig

REWARD_TOKEN = "<|box_start|>"  # a vision token: never produced or read in text chats


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: P(chosen preferred) = sigmoid(s_c - s_r); the loss is its mean negative log."""
    return -F.logsigmoid(chosen - rejected).mean()


def check_pair(record) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "a pair needs a non-empty 'messages' list"
    if not all(isinstance(record.get(k), str) and record[k] for k in ("chosen", "rejected")):
        return "a pair needs non-empty 'chosen' and 'rejected' strings"
    return None


def encode_response(tokenizer, messages: list[dict], response: str, max_len: int = 1024) -> list[int]:
    """Prompt (chat template, generation prompt) + response + <|im_end|>: what the policy would have produced."""
    ids = encode_prompt(tokenizer, messages) + tokenizer.encode(response, allow_special=True)
    return (ids + [tokenizer.eos_token_id])[-max_len:]


def scores(model, input_ids: torch.Tensor, last: torch.Tensor, reward_id: int) -> torch.Tensor:
    """The scalar head at each row's last real token."""
    logits = model(input_ids).logits
    return logits[torch.arange(len(last), device=last.device), last, reward_id].float()


class RewardModel:
    """Scores responses for GRPO (the "rm" reward kind)."""

    def __init__(self, path: str, device=None):
        self.model, self.tokenizer = load(path, dtype=torch.float32, device=device)
        self.reward_id = self.tokenizer.token_to_id(REWARD_TOKEN)

    @torch.no_grad()
    def score(self, tokenizer, messages: list[dict], response: str) -> float:
        ids = encode_response(self.tokenizer, messages, response)
        device = self.model.lm_head.weight.device
        logits = self.model(torch.tensor([ids], device=device), logits_to_keep=1).logits
        return logits[0, -1, self.reward_id].float().item()


class PairBatches:
    """Batches of B pairs: rows 0..B-1 chosen, B..2B-1 rejected, right-padded; labels mark one target per pair so
    the Trainer's token normalisation counts pairs."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
        self.pairs, self.batch_size, self.pad_id, self.position = pairs, batch_size, pad_id, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        chosen, rejected = [], []
        for _ in range(self.batch_size):
            c, r = self.pairs[self.position % len(self.pairs)]
            chosen.append(c), rejected.append(r)
            self.position += 1
        rows = chosen + rejected
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
        labels = torch.full_like(input_ids, -100)
        labels[:self.batch_size, 1] = 0
        return dict(input_ids=input_ids, labels=labels, last=torch.tensor([len(r) - 1 for r in rows]))


def run_rm(model_path: str, pairs_file: str, out: str, steps: int, batch_size: int, lr: float | None,
           on_bad_line: str = "skip", device=None, **train_options) -> str:
    """Train a reward model from a policy checkpoint on preference pairs; returns its checkpoint folder."""
    model, tokenizer = load(model_path, dtype=torch.float32, device="cpu")
    lr = model_lr(lr, model.config, nano=3e-4, released=1e-5)
    reward_id = tokenizer.token_to_id(REWARD_TOKEN)
    records = read_jsonl(pairs_file, check_pair, on_bad_line)
    if not records:
        raise ValueError(f"{pairs_file}: no preference pairs")
    pairs = [(encode_response(tokenizer, r["messages"], r["chosen"]),
              encode_response(tokenizer, r["messages"], r["rejected"])) for r in records]

    def loss_fn(model, batch, expert_counter=None):
        s = scores(model, batch["input_ids"], batch["last"], reward_id)
        half = len(s) // 2
        return bt_loss(s[:half], s[half:]), torch.tensor(half, device=s.device)

    config = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                         weight_decay=0.0, **train_options)
    print(f"rm: {len(pairs)} preference pairs, {steps} steps of {batch_size} pairs, lr {lr:.1e}")
    MeteredTrainer(model, config, PairBatches(pairs, batch_size, tokenizer.pad_token_id), loss_fn=loss_fn,
                   tokenizer=tokenizer, device=device, compute=Compute(out)).train()  # the pairs' rollouts: not counted
    return latest_checkpoint(out)


@torch.no_grad()
def pairwise_accuracy(path: str, pairs_file: str, device=None) -> float:
    """How often the reward model scores the chosen response above the rejected one."""
    rm = RewardModel(path, device)
    records = read_jsonl(pairs_file, check_pair)
    wins = sum(rm.score(None, r["messages"], r["chosen"]) > rm.score(None, r["messages"], r["rejected"])
               for r in records)
    return wins / max(1, len(records))


@dataclass(kw_only=True)
class RMOptions(RunOptions, TaskOptions):
    model: str = option(help="the policy checkpoint the reward model starts from (or a run folder)")
    pairs: str | None = option(None, "pairs JSONL (messages, chosen, rejected); default: from the model's rollouts")
    samples: int = option(256, "prompts whose rollouts make pairs (when no pairs file is given)", check=POSITIVE)
    steps: int = option(100, "optimizer steps", check=POSITIVE)
    batch_size: int = option(8, "pairs per step", check=POSITIVE)
    lr: float | None = option(None, "learning rate (default: 3e-4 for the nano presets, 1e-5 for released shapes)",
                              type=float)
    on_bad_line: str = option("skip", "malformed JSONL lines", choices=["skip", "error"])


def run(o: RMOptions) -> str:
    """The reward-model stage: pairs (the file, or correct-vs-wrong rollouts of the model), then Bradley-Terry."""
    from ..checkpoint import resolve
    from . import posttrain
    model, pairs = resolve(o.model), o.pairs
    if not pairs:
        pairs = posttrain.write_jsonl(posttrain.preference_pairs(model, o.samples, o.seed, device=o.device,
                                                                 **o.task_filter()),
                                      os.path.join(o.out, "pairs.jsonl"))
    path = run_rm(model, pairs, o.out, steps=o.steps, batch_size=o.batch_size, lr=o.lr, on_bad_line=o.on_bad_line,
                  device=o.device, log_every=o.log_every, progress=o.progress, save_every=o.save_every)
    print(f"rm done: {path}  (pairwise accuracy on its training pairs {pairwise_accuracy(path, pairs, o.device):.3f})")
    return path
