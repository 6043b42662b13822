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
from ..data import TEXT_SPLITS
from ..config import get_preset, padded_vocab_size
from ..tokenizer import load_tokenizer, train_tokenizer
from .options import AT_LEAST_0, POSITIVE, RunOptions, option
from .parallelize import init_distributed, is_distributed
from .trainer import TrainConfig, Trainer, resume_checkpoint


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
# per user corpus, the held-out documents: 1% of them, at least 8, at most 256, always fewer than half
HELD_OUT_FRACTION, HELD_OUT_MIN, HELD_OUT_MAX = 0.01, 8, 256


def stage_seq_len(stage: int, preset: str) -> int:
    return STAGES[stage].seq_len // (SMALL_SEQ_DIVISOR if preset.startswith("nano") else 1)


@dataclass
class Corpus:
    """A user corpus and its held-out documents: every `stride`-th one from the first, `held` of them."""
    source: str
    read_options: dict  # text_split and text_field of data.iter_documents
    count: int          # its documents, counted up to HELD_OUT_MAX / HELD_OUT_FRACTION (past it the cap applies)
    held: int
    stride: int

    def split(self, split: str):
        """The documents of one side: "test" (held out) or "train" (the rest)."""
        docs = data.iter_documents(self.source, **self.read_options)
        if split == "test":  # stop after the last held-out document: never read a big corpus to its end for them
            return itertools.islice(docs, 0, self.held * self.stride, self.stride) if self.held else iter(())
        return (doc for i, doc in enumerate(docs) if i % self.stride or i >= self.held * self.stride) \
            if self.held else docs


def open_corpus(source: str, text_split: str = "paragraph", text_field: str = "text") -> Corpus:
    """A corpus checked and counted, its held-out share sized: HELD_OUT_FRACTION of its documents, at least
    HELD_OUT_MIN, at most HELD_OUT_MAX, and fewer than half of them, so the training side is never empty."""
    data.check_corpus(source)
    read_options = dict(text_split=text_split, text_field=text_field)
    limit = int(HELD_OUT_MAX / HELD_OUT_FRACTION)
    count = sum(1 for _ in itertools.islice(data.iter_documents(source, **read_options), limit))
    if count == 0:
        raise ValueError(f"{source}: no documents (every file is empty)")
    held = min(max(HELD_OUT_MIN, round(HELD_OUT_FRACTION * count)), HELD_OUT_MAX, count // 2)
    return Corpus(source, read_options, count, held, count // held if held else 0)


def documents(stage: int, split: str, seed: int, tokenizer, seq_len: int, corpora: list[Corpus] = (),
              synthetic_weight=None, tasks=None, difficulty=None, languages=None):
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
    for corpus in corpora:
        streams.append(corpus.split(split))
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
    text_split: str = option("paragraph", "how a .txt file holds documents: blank-line paragraphs, one per line, or "
                                          "the whole file", choices=list(TEXT_SPLITS))
    text_field: str = option("text", "the field (.jsonl, hf:) or column (.parquet) that holds the text")
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
    mtp_loss_weight: float | None = option(None, "weight of the multi-token-prediction loss beside the next-token "
                                                 "loss (models with an MTP head: nano-next-*, Qwen3-Next; default: "
                                                 "the config's, 0.3; 0 turns it off)", type=float, check=AT_LEAST_0)
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
    s, small = STAGES[o.stage], o.preset.startswith("nano")
    limit = get_preset(o.preset).max_position_embeddings  # an unknown preset fails here, with the known ones
    corpora = [open_corpus(path, o.text_split, o.text_field) for path in o.data]  # a bad corpus fails now
    rank, world_size, device = init_distributed()
    device = torch.device(o.device) if o.device and world_size == 1 else device
    stage_dir = os.path.join(o.out, f"stage{o.stage}")
    seq_len = o.seq_len or stage_seq_len(o.stage, o.preset)
    if seq_len > limit:
        raise ValueError(f"sequence length {seq_len} is above the model's limit (max_position_embeddings {limit})")
    batch_size = o.batch_size or (max(1, 4096 // seq_len) if small else 1)
    steps = o.steps or (s.steps if small else 10_000)
    resume_from = resume_checkpoint(stage_dir) if o.resume else None

    if rank == 0:
        tokenizer = build_tokenizer(o.preset, o.out, o.vocab_size, corpora, o.seed, o.task_filter())
    _barrier()
    tokenizer = build_tokenizer(o.preset, o.out, o.vocab_size, corpora, o.seed, o.task_filter()) if rank else tokenizer
    model = stage_model(o, tokenizer, small)
    tokens_needed = steps * o.grad_accum * batch_size * world_size * seq_len
    loader, eval_batches = stage_data(o, stage_dir, corpora, tokenizer, seq_len, batch_size, tokens_needed, rank,
                                      world_size)
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


def stage_model(o: PretrainOptions, tokenizer, small: bool):
    """Stage 1 from scratch (vocabulary sized to a trained tokenizer); later stages from the previous stage's final
    weights, stage 3 with its RoPE base raised (ABF). --mtp-loss-weight goes into the config (saved with it)."""
    model = _stage_model(o, tokenizer, small)
    if o.mtp_loss_weight is not None:
        if not model.config.num_nextn_predict_layers:
            raise ValueError(f"--mtp-loss-weight: {o.preset} has no multi-token-prediction head "
                             "(nano-next-* presets and Qwen3-Next checkpoints have one)")
        model.config.mtp_loss_weight = o.mtp_loss_weight
    return model


def _stage_model(o: PretrainOptions, tokenizer, small: bool):
    if o.stage == 1:
        overrides = dict(vocab_size=padded_vocab_size(tokenizer.vocab_size)) if small else {}
        torch.manual_seed(o.seed)
        return load_model(o.preset, rope_theta=10_000.0, **overrides)
    previous_dir = os.path.join(o.out, f"stage{o.stage - 1}")
    previous = latest_checkpoint(previous_dir)
    if previous is None:
        raise FileNotFoundError(f"stage {o.stage} starts from stage {o.stage - 1}: no checkpoint in {previous_dir} "
                                f"(run --stage {o.stage - 1} first)")
    model = load_model(previous, dtype=torch.float32)
    if STAGES[o.stage].abf_factor != 1.0:  # the raised base is saved with the config
        model.config.rope_theta *= STAGES[o.stage].abf_factor
        model.to(torch.float32)  # re-derives the RoPE frequencies from the config
    return model


def stage_data(o: PretrainOptions, stage_dir: str, corpora, tokenizer, seq_len: int, batch_size: int,
               tokens_needed: int, rank: int, world_size: int):
    """(train loader, held-out batches): the stage's documents tokenised once into shards (rank 0), then
    memory-mapped by every rank. A one-document corpus holds nothing out: no held-out loss then."""
    data_dir = os.path.join(stage_dir, "data")
    splits = (("train", int(tokens_needed * 1.05) + seq_len), ("test", 8 * batch_size * seq_len))
    splits = splits if not corpora or any(c.held for c in corpora) else splits[:1]
    if rank == 0 and not (o.resume and os.path.exists(os.path.join(data_dir, "train", "meta.json"))):
        if not o.resume:
            shutil.rmtree(stage_dir, ignore_errors=True)
        for split, budget in splits:
            data.write_shards(documents(o.stage, split, o.seed, tokenizer, seq_len, corpora, **o.task_filter()),
                              tokenizer, os.path.join(data_dir, split), max_tokens=budget)
    _barrier()
    if rank == 0:
        describe_data(data_dir, corpora, tokens_needed)
    whole = STAGES[o.stage].mix == "long"  # long documents are seen whole, never cut across rows
    loader = data.PackedLoader(os.path.join(data_dir, "train"), batch_size, seq_len, o.seed, rank, world_size,
                               whole_documents=whole)
    if not os.path.exists(os.path.join(data_dir, "test", "meta.json")):
        return loader, []
    held_out = data.PackedLoader(os.path.join(data_dir, "test"), batch_size, seq_len, o.seed, rank, world_size,
                                 whole_documents=whole)
    return loader, [held_out.next_batch() for _ in range(4)]


def describe_data(data_dir: str, corpora: list[Corpus], tokens_needed: int) -> None:
    """How each corpus was split and how many documents and tokens went to each side, in the log."""
    for c in corpora:
        more = "+" if c.count >= HELD_OUT_MAX / HELD_OUT_FRACTION else ""
        print(f"data: {c.source}: {c.count:,}{more} documents, {c.held:,} held out")
    train = data.read_meta(os.path.join(data_dir, "train"))
    repeats = f" (seen {tokens_needed / train['num_tokens']:.1f} times)" if train["num_tokens"] < tokens_needed else ""
    line = f"data: train {train['num_documents']:,} documents, {train['num_tokens']:,} tokens{repeats}"
    if os.path.exists(os.path.join(data_dir, "test", "meta.json")):
        test = data.read_meta(os.path.join(data_dir, "test"))
        print(f"{line} | held out {test['num_documents']:,} documents, {test['num_tokens']:,} tokens")
    else:
        print(f"{line} | held out: none (too few documents to spare one: no held-out loss)")


def _barrier():
    if is_distributed():
        dist.barrier()
