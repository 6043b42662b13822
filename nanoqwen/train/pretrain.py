"""The three pre-training stages of the Qwen3 report, each a short config, and one entry point.

    nanoqwen pretrain --stage 1 --preset nano-d4 --out runs/nano-d4      # general mix
    nanoqwen pretrain --stage 2 --preset nano-d4 --out runs/nano-d4      # reasoning-heavy, accelerated LR decay
    nanoqwen pretrain --stage 3 --preset nano-d4 --out runs/nano-d4      # long context, RoPE base 10k -> 1M (ABF)

Stage N writes OUT/stageN/ (data shards, step_NNNNNN checkpoints, metrics.jsonl, loss.png) and starts from the
weights of OUT/stage{N-1}/latest. Small presets train their own BBPE tokenizer on the stage-1 corpus (OUT/tokenizer);
released shapes use the official Qwen3 tokenizer. The LR schedule runs across stages as one WSD: stage 1 warms up
and stays at the peak, stage 2 is the decay, compressed into its short budget, stage 3 re-warms to a lower peak.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import data
from ..checkpoint import latest_checkpoint, load_model
from ..config import get_preset, padded_vocab_size
from ..tokenizer import load_tokenizer, train_tokenizer
from .options import AT_LEAST_0, POSITIVE, RunOptions, option
from .parallelize import init_distributed, is_distributed
from .trainer import TrainConfig, Trainer


@dataclass
class Stage:
    mix: str                # "general", "reasoning" or "long"
    task_weight: float      # task documents vs general prose (general and reasoning mixes)
    prose_weight: float
    difficulty: tuple       # task difficulty range
    seq_len: int            # released shapes; small presets use seq_len // 16
    steps: int              # default budget for small presets
    lr_scale: float         # x the preset's peak LR
    warmup: float           # fraction of steps
    schedule: str
    decay_fraction: float = 0.0
    min_lr_ratio: float = 0.1
    abf_factor: float = 1.0  # RoPE base multiplied at the start of the stage (ABF)


STAGES = {
    1: Stage("general", task_weight=1.0, prose_weight=1.0, difficulty=(1, 3), seq_len=4096, steps=400, lr_scale=1.0,
             warmup=0.05, schedule="wsd", decay_fraction=0.0),  # warmup, then stable: the decay is stage 2
    2: Stage("reasoning", task_weight=4.0, prose_weight=1.0, difficulty=(1, 5), seq_len=4096, steps=100,
             lr_scale=1.0, warmup=0.0, schedule="cosine", min_lr_ratio=0.05),  # accelerated decay to 5%
    3: Stage("long", task_weight=0.0, prose_weight=0.0, difficulty=(1, 5), seq_len=32768, steps=100, lr_scale=0.5,
             warmup=0.1, schedule="cosine", abf_factor=100.0),  # RoPE base 10,000 -> 1,000,000
}
SMALL_SEQ_DIVISOR = 16  # 4096 -> 256 and 32768 -> 2048: stage 3 is 8x stage 1, as in the report
HELD_OUT_DOCUMENTS = 256  # per user corpus: its first documents are the held-out set


def stage_seq_len(stage: int, preset: str) -> int:
    return STAGES[stage].seq_len // (SMALL_SEQ_DIVISOR if preset.startswith("nano") else 1)


def documents(stage: int, split: str, seed: int, tokenizer, seq_len: int, corpora=(), synthetic_weight=None,
              tasks=None, difficulty=None, languages=None):
    """The stage's document stream: the embedded mix (or long documents) and the user's corpora, by weight.
    tasks / difficulty / languages narrow the embedded task families (difficulty replaces the stage's range)."""
    s = STAGES[stage]
    synthetic_weight = (0.0 if corpora else 1.0) if synthetic_weight is None else synthetic_weight
    if s.mix == "long":
        synthetic = data.long_documents(tokenizer, seq_len, split, seed, tasks=tasks, languages=languages,
                                        difficulty=difficulty)
    else:
        synthetic = data.synthetic_corpus(split, seed, s.task_weight, s.prose_weight, tasks=tasks,
                                          difficulty=difficulty or s.difficulty, languages=languages)
    streams, weights = ([synthetic], [synthetic_weight]) if synthetic_weight > 0 else ([], [])
    for path in corpora:
        docs = data.iter_documents(path)
        held = itertools.islice(docs, HELD_OUT_DOCUMENTS)
        streams.append(held if split == "test" else itertools.islice(docs, HELD_OUT_DOCUMENTS, None))
        weights.append(1.0)
    return data.mix(streams, weights, seed)


def build_tokenizer(preset: str, out: str, vocab_size: int, corpora, seed: int, task_filter=None):
    """Official Qwen3 tokenizer for released shapes; a BBPE trained on the stage-1 corpus for small presets."""
    if not preset.startswith("nano"):
        return load_tokenizer()
    path = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        sample = itertools.islice(documents(1, "train", seed, None, 0, corpora, **(task_filter or {})),
                                  min(20_000, 10 * vocab_size))
        tokenizer = train_tokenizer(sample, vocab_size, save_dir=path + ".tmp")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)  # complete or absent
        return tokenizer
    return load_tokenizer(path)


@dataclass(kw_only=True)
class PretrainOptions(RunOptions):
    stage: int = option(help="1 general, 2 reasoning, 3 long context", choices=[1, 2, 3])
    preset: str = option(help="model preset (nano-* train their own tokenizer)")
    out: str = option("runs/pretrain", "run folder; stage N writes OUT/stageN")
    resume: bool = option(False, "continue this stage from OUT/stageN/latest")
    data: list = option((), "a corpus: .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG] (repeatable; "
                            "default: the embedded task generators and prose)", append=True)
    steps: int | None = option(None, "optimizer steps (default: the stage's budget for small presets)",
                               type=int, check=POSITIVE)
    batch_size: int | None = option(None, "rows per micro-batch per rank", type=int, check=POSITIVE)
    grad_accum: int = option(1, "micro-batches per optimizer step", check=POSITIVE)
    seq_len: int | None = option(None, "tokens per row (default: the stage's)", type=int, check=POSITIVE)
    lr: float | None = option(None, "peak learning rate (default: by model size, see learning_rate)", type=float)
    vocab_size: int = option(4096, "trained tokenizer size (nano presets)", check=POSITIVE)
    tasks: str | None = option(None, "embedded task families, comma-separated (default: all)")
    difficulty: str | None = option(None, "N or LO-HI (default: the stage's range)")
    languages: str | None = option(None, "comma-separated: en,zh,fr (default: all)")
    parallel: str = option("fsdp", "under torchrun", choices=["fsdp", "ddp"])
    compile: bool = option(False, "torch.compile the model")
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass")
    eval_every: int = option(0, "held-out loss every N steps (0: at the end)", check=AT_LEAST_0)
    wandb: str | None = option(None, "log to wandb (when installed)", metavar="PROJECT")
    tensorboard: bool = option(False, "log to tensorboard (when installed)")

    def task_filter(self) -> dict:
        from ..tasks import parse_filter
        return parse_filter(self.tasks, self.difficulty, self.languages)


def learning_rate(stage: int, config, small: bool) -> float:
    """The peak LR of a stage: 3e-3 for hidden sizes up to 512, 1e-3 above (small presets), 3e-4 for released
    shapes; times the stage's lr_scale."""
    return ((3e-3 if config.hidden_size <= 512 else 1e-3) if small else 3e-4) * STAGES[stage].lr_scale


def run(o: PretrainOptions) -> str:
    """Train one stage; returns the path of its final checkpoint (an HF model folder)."""
    if o.stage not in STAGES:
        raise ValueError(f"--stage must be 1, 2 or 3, got {o.stage}")
    s, small, task_filter = STAGES[o.stage], o.preset.startswith("nano"), o.task_filter()
    limit = get_preset(o.preset).max_position_embeddings  # an unknown preset fails here, with the known ones
    for path in o.data:
        data.corpus_files(path) if not path.startswith("hf:") else None  # a missing path fails now, in one line
    rank, world_size, device = init_distributed()
    device = torch.device(o.device) if o.device and world_size == 1 else device
    stage_dir = os.path.join(o.out, f"stage{o.stage}")
    seq_len = o.seq_len or stage_seq_len(o.stage, o.preset)
    if seq_len > limit:
        raise ValueError(f"sequence length {seq_len} is above the model's limit (max_position_embeddings {limit})")
    batch_size = o.batch_size or (max(1, 4096 // seq_len) if small else 1)
    steps = o.steps or (s.steps if small else 10_000)
    resume_from = latest_checkpoint(stage_dir) if o.resume else None
    if o.resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {stage_dir}")

    # the model: stage 1 from scratch, later stages from the previous stage's final weights
    if rank == 0:
        tokenizer = build_tokenizer(o.preset, o.out, o.vocab_size, o.data, o.seed, task_filter)
    _barrier()
    tokenizer = build_tokenizer(o.preset, o.out, o.vocab_size, o.data, o.seed, task_filter) if rank else tokenizer
    if o.stage == 1:
        overrides = dict(vocab_size=padded_vocab_size(tokenizer.vocab_size)) if small else {}
        torch.manual_seed(o.seed)
        model = load_model(o.preset, rope_theta=10_000.0, **overrides)
    else:
        previous = latest_checkpoint(os.path.join(o.out, f"stage{o.stage - 1}"))
        if previous is None:
            raise FileNotFoundError(f"stage {o.stage} starts from stage {o.stage - 1}: no checkpoint in "
                                    f"{os.path.join(o.out, f'stage{o.stage - 1}')} (run --stage {o.stage - 1} first)")
        model = load_model(previous, dtype=torch.float32)
        if s.abf_factor != 1.0:  # ABF: raise the RoPE base; it is saved with the config
            model.config.rope_theta *= s.abf_factor
            model.to(torch.float32)  # re-derives the RoPE frequencies from the config

    # the data: tokenised once into shards (rank 0), then memory-mapped by every rank
    tokens_needed = steps * o.grad_accum * batch_size * world_size * seq_len
    if rank == 0 and not (o.resume and os.path.exists(os.path.join(stage_dir, "data", "train", "meta.json"))):
        if not o.resume:
            shutil.rmtree(stage_dir, ignore_errors=True)
        for split, budget in (("train", int(tokens_needed * 1.05) + seq_len), ("test", 8 * batch_size * seq_len)):
            data.write_shards(documents(o.stage, split, o.seed, tokenizer, seq_len, o.data, **task_filter),
                              tokenizer, os.path.join(stage_dir, "data", split), max_tokens=budget)
    _barrier()
    whole = s.mix == "long"  # long documents are seen whole, never cut across rows
    loader = data.PackedLoader(os.path.join(stage_dir, "data", "train"), batch_size, seq_len, o.seed, rank,
                               world_size, whole_documents=whole)
    held_out = data.PackedLoader(os.path.join(stage_dir, "data", "test"), batch_size, seq_len, o.seed, rank,
                                 world_size, whole_documents=whole)
    eval_batches = [held_out.next_batch() for _ in range(4)]

    peak_lr = o.lr or learning_rate(o.stage, model.config, small)
    config = TrainConfig(out_dir=stage_dir, steps=steps, batch_size=batch_size, grad_accum=o.grad_accum, lr=peak_lr,
                         warmup_steps=int(s.warmup * steps), schedule=s.schedule, decay_fraction=s.decay_fraction,
                         min_lr_ratio=s.min_lr_ratio, seed=o.seed, compile=o.compile,
                         activation_checkpointing=o.activation_checkpointing, parallel=o.parallel,
                         log_every=o.log_every, eval_every=o.eval_every, save_every=o.save_every,
                         progress=o.progress, wandb_project=o.wandb, tensorboard=o.tensorboard)
    if rank == 0:
        print(f"stage {o.stage} ({s.mix}): {o.preset}, {model.config.num_parameters():,} parameters, seq {seq_len}, "
              f"global batch {batch_size * o.grad_accum * world_size} rows, {steps} steps, peak lr {peak_lr:.1e}, "
              f"rope_theta {model.config.rope_theta:,.0f}, {world_size} rank(s) on {device.type}")
    random.seed(o.seed)
    trainer = Trainer(model, config, loader, eval_batches, tokenizer=tokenizer, device=device, resume_from=resume_from)
    trainer.train()
    return latest_checkpoint(stage_dir)


def _barrier():
    if is_distributed():
        dist.barrier()
