"""Supervised fine-tuning on conversations (post-training stages 1 and 3) on the shared Trainer.

Data: JSONL, one conversation a line, in the OpenAI messages format: {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "reasoning_content": ..., "content": ..., "tool_calls": [...]}], "tools": [...]?}. Each is
rendered with the chat template; the loss mask keeps what assistant turns produce (render_for_training), so the
labels are the token ids there and -100 elsewhere. Malformed lines are reported as FILE:LINE and skipped, or stop the
run with --on-bad-line error.

Every step's tokens and FLOPs are counted (trainer.Compute / MeteredTrainer) into metrics.jsonl and OUT/compute.json.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from ..checkpoint import latest_checkpoint, load
from ..data import iter_jsonl
from .options import POSITIVE, RunOptions, TaskOptions, model_lr, option
from .trainer import Compute, MeteredTrainer, TrainConfig, resume_checkpoint

ROLES = {"system", "user", "assistant", "tool"}


def check_conversation(record) -> str | None:
    """Why a record is not a trainable conversation, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "a record needs a non-empty 'messages' list"
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"message {i} needs a role among {sorted(ROLES)}"
        if not isinstance(m.get("content") or "", str) or not isinstance(m.get("reasoning_content") or "", str):
            return f"message {i}: content and reasoning_content must be strings"
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "no assistant turn to learn"
    return None


def read_jsonl(path: str, check=check_conversation, on_bad_line: str = "skip") -> list[dict]:
    """The valid records of a JSONL file; each bad line is reported as PATH:LINE: reason (and raises with 'error')."""
    return list(iter_jsonl(path, check, on_bad_line))


def encode_conversation(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation, truncated to max_len tokens. An assistant message with "weight": 0
    (as in OpenAI fine-tuning files) is context, not target."""
    ids, mask = tokenizer.render_for_training(record["messages"], tools=record.get("tools"))
    weights = [m.get("weight", 1) for m in record["messages"] if m["role"] == "assistant"]
    if 0 in weights:  # the k-th `<|im_start|>assistant` header opens the k-th assistant message
        start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
        header = tokenizer.encode("assistant")
        turns = [p for p in range(len(ids)) if ids[p] == start and ids[p + 1:p + 1 + len(header)] == header]
        for position, weight in zip(turns, weights):
            if weight == 0:
                stop = ids.index(end, position + 1)
                mask[position:stop + 1] = [0] * (stop + 1 - position)
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return ids[:max_len], labels[:max_len]


class ConversationBatches:
    """Shuffled, right-padded batches of encoded conversations, forever (epoch by epoch); resumable."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int = 0):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.position = 0, 0
        self._order()

    def _order(self):
        self.order = list(range(len(self.examples)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(self.order)

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        for _ in range(self.batch_size):
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order()
            rows.append(self.examples[self.order[self.position]])
            self.position += 1
        return pad_batch(rows, self.pad_id)


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right padding: causal attention never lets real tokens see the pad after them, and pads carry no label."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, :len(ids)], labels[i, :len(target)] = torch.tensor(ids), torch.tensor(target)
    return dict(input_ids=input_ids, labels=labels)


def run_sft(model_path: str, records: list[dict], out: str, steps: int, batch_size: int, lr: float | None, max_len: int,
            seed: int = 0, resume: bool = False, device=None, compute: Compute | None = None, **train_options) -> str:
    """Fine-tune the checkpoint at model_path on conversations; returns the final checkpoint folder. `compute`
    carries what producing the data cost (e.g. a teacher's generation); OUT/compute.json gets the totals."""
    model, tokenizer = load(model_path, dtype=torch.float32, device="cpu")
    lr = model_lr(lr, model.config, nano=1e-3, released=2e-5)
    examples = [encode_conversation(tokenizer, r, max_len) for r in records]
    examples = [e for e in examples if any(t != -100 for t in e[1][1:])]
    if not examples:
        raise ValueError("no conversation has an assistant token to learn")
    batches = ConversationBatches(examples, batch_size, tokenizer.pad_token_id, seed)
    config = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                         schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, seed=seed, **train_options)
    print(f"sft: {len(examples)} conversations, {sum(sum(t != -100 for t in e[1]) for e in examples):,} target "
          f"tokens, {steps} steps of {batch_size}, lr {lr:.1e}")
    MeteredTrainer(model, config, batches, tokenizer=tokenizer, device=device,
                   resume_from=resume_checkpoint(out) if resume else None,
                   compute=compute or Compute(out, resume)).train()
    return latest_checkpoint(out)


@dataclass(kw_only=True)
class SFTOptions(RunOptions, TaskOptions):
    stage: str = option(help="coldstart (long-CoT traces) or fusion (/think + /no_think mix)",
                        choices=["coldstart", "fusion"])
    model: str = option(help="checkpoint folder, or a run folder with a `latest` file")
    data: str | None = option(None, "conversations JSONL (OpenAI messages); default: built from tasks")
    steps: int = option(200, "optimizer steps", check=POSITIVE)
    batch_size: int = option(16, "conversations per step", check=POSITIVE)
    lr: float | None = option(None, "peak learning rate, cosine to a tenth after a 10%% warmup (default: 1e-3 for "
                                    "the nano presets, 2e-5 for released shapes)", type=float)
    max_len: int = option(1024, "tokens per conversation (longer ones are cut)", check=POSITIVE)
    filter: bool = option(True, "coldstart: keep queries the model answers directly", flag="--no-filter")
    on_bad_line: str = option("skip", "malformed JSONL lines", choices=["skip", "error"])
    resume: bool = option(False, "continue from OUT/latest")


def run(o: SFTOptions) -> str:
    """An SFT stage from its options: the data (the file, or built from the tasks and written to OUT), then training."""
    from ..checkpoint import resolve
    from . import posttrain
    model = resolve(o.model)
    if o.data:
        records = read_jsonl(o.data, on_bad_line=o.on_bad_line)
    elif o.stage == "coldstart":
        records = posttrain.coldstart_data(model, o.samples, o.seed, o.filter, device=o.device, **o.task_filter())
    else:
        records = posttrain.fusion_data(model, o.samples, o.seed, device=o.device, **o.task_filter())
    if not o.data:
        print(f"data: {posttrain.write_jsonl(records, os.path.join(o.out, f'{o.stage}.jsonl'))}")
    return run_sft(model, records, o.out, steps=o.steps, batch_size=o.batch_size, lr=o.lr, max_len=o.max_len,
                   seed=o.seed, resume=o.resume, device=o.device, log_every=o.log_every, progress=o.progress,
                   save_every=o.save_every)
