"""The one training core shared by every stage (pre-training, SFT, RL, distillation).

A stage supplies a model, a batch source (any iterator of batch dicts; if it has state_dict/load_state_dict its
position is checkpointed) and optionally a loss function `loss_fn(model, batch, expert_counter) -> (mean loss,
number of target tokens[, {name: a loss logged apart, e.g. mtp_loss}])`; micro-batches weigh by their label count
(1 each when a batch has no labels). The
Trainer owns the rest: AdamW with weight-decay groups, the LR schedule, gradient
accumulation and clipping, bf16 autocast on GPU (fp32 on CPU), FSDP2/DDP under torchrun, logging and checkpoints.

Weight decay: matrices (attention, MLP, experts, router) decay; norms and the token embedding (and the lm_head tied
to it) do not: a norm gain is a scale, not a feature detector, and decaying rare tokens' embeddings erases them.
Qwen3-Next's zero-centred norms are the exception the report makes: their weight is the gain minus 1, so decay pulls
the gain towards 1.

Checkpoint layout: OUT/step_NNNNNN/ = an HF model folder (config.json, model.safetensors, tokenizer files) plus
trainer_state.pt (optimizer, scheduler, step, data position, RNG states of every rank). Full (unsharded) tensors are
gathered to rank 0, so a checkpoint resumes on any number of ranks. Written into OUT/.tmp-*, fsynced, renamed, then
OUT/latest (one line: the folder name) is replaced atomically; the previous checkpoint is deleted only after that.

Compute accounting (SFT, GRPO and distillation): `Compute` adds up the tokens and FLOPs a run spends and
`MeteredTrainer` (the Trainer plus that) writes each step's share into metrics.jsonl and the totals into
OUT/compute.json, under the same keys for every stage:

    generated_tokens  tokens sampled by the engine           generation_flops  2 N (prompt + generated tokens)
    prompt_tokens     prompt tokens it prefilled             scoring_flops     2 N x rows x width of no-grad forwards
    scored_tokens     tokens of no-grad forwards (teacher,   training_flops    6 N x rows x width of forward + backward
                      old log-probs, reference)
    trained_tokens    tokens of forward + backward           flops / tokens    the sums
    (batched rows count their padding, as the Trainer's own `tokens` does)

N is flops_per_token's count: the active matmul weights (non-embedding parameters, the lm_head included) plus causal
attention, 6 L H d_head x sequence length per token for forward + backward; a forward is a third of that. Packed
rows count attention per document (training_flops): a row of 4 documents costs a quarter of a one-document row's
attention, and MFU is printed from that count.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_write
from ..checkpoint import latest_checkpoint, load_model, model_class, save_model
from ..model import ExpertCounter, Qwen3ForCausalLM
from ..hardware import device_peak
from .parallelize import is_distributed, parallelize


@dataclass
class TrainConfig:
    out_dir: str
    steps: int
    batch_size: int = 8          # rows per micro-batch per rank
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1    # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 0
    schedule: str = "cosine"     # "cosine" or "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0          # 0: evaluate only at the end (when there is held-out data)
    save_every: int = 0          # 0: save only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    parallel: str = "fsdp"       # under torchrun: "fsdp" (FSDP2) or "ddp"
    compile: bool = False
    activation_checkpointing: bool = False
    progress: bool = True        # tqdm bar on rank 0
    wandb_project: str | None = None
    tensorboard: bool = False
    max_flops: float | None = None  # MeteredTrainer: stop once the run's compute reaches this (compute-matched runs)


def lr_multiplier(step: int, c: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio, or stable then linear decay over the last decay_fraction (WSD)."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    if c.schedule == "cosine":
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(c.steps * (1 - c.decay_fraction))
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - c.min_lr_ratio) * min(1.0, (step - decay_start) / max(1, c.steps - decay_start))


def lm_loss(model, batch: dict, expert_counter=None):
    """Next-token loss of a batch with input_ids, labels and (packed rows) document_ids; and its target count.
    A Qwen3-Next model training its multi-token-prediction head adds its loss to the one returned and reports it
    apart, as a third item {"mtp_loss": ...}, which the Trainer logs."""
    out = model(**batch, expert_counter=expert_counter)
    targets = (batch["labels"][:, 1:] != -100).sum()
    mtp_loss = getattr(out, "mtp_loss", None)
    return (out.loss, targets) if mtp_loss is None else (out.loss, targets, {"mtp_loss": mtp_loss})


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of causal rows seq_len long: 6 per active matmul weight, plus causal attention (in the
    full-attention layers; the hybrid's DeltaNet layers cost a constant per token, counted with their weights)."""
    matmul = config.num_parameters(active_only=True) - (0 if config.tie_word_embeddings else
                                                        config.vocab_size * config.hidden_size)
    return 6 * matmul + _attention_width(config) * seq_len


def _attention_width(config) -> float:
    """Training FLOPs of causal attention per query and key position: 6 x attention layers x heads x head_dim."""
    attention_layers = sum(not config.is_linear_layer(i) for i in range(config.num_hidden_layers))
    return 6 * attention_layers * config.num_attention_heads * config.head_dim


def attended_pairs(batch: dict):
    """Sum over the batch's rows of each document's length squared: what causal attention costs, in units of
    flops_per_token's attention term. A row without document_ids is one document; padding (id < 0) costs nothing.
    With document_ids, a 0-d tensor on their device (no device sync here)."""
    ids = batch["input_ids"]
    docs = batch.get("document_ids")
    if docs is None:
        return ids.shape[0] * ids.shape[-1] ** 2
    rows = docs.reshape(-1, docs.shape[-1]).long()
    tagged = torch.where(rows < 0, -1, rows + (rows.max() + 1) * torch.arange(len(rows), device=rows.device)[:, None])
    values, counts = torch.unique_consecutive(tagged.flatten(), return_counts=True)
    return (counts[values >= 0].long() ** 2).sum()


def training_flops(config, tokens: int, pairs: int) -> float:
    """Training FLOPs of a step over `tokens` tokens whose documents attend over `pairs` (attended_pairs): packed
    documents are counted per document, never as full-row attention."""
    return tokens * flops_per_token(config, 0) + _attention_width(config) * pairs


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(value)
    return value


class Trainer:
    def __init__(self, model: Qwen3ForCausalLM, config: TrainConfig, train_data, eval_batches: list | None = None,
                 loss_fn=lm_loss, tokenizer=None, device=None, resume_from: str | None = None):
        self.config, self.tokenizer, self.loss_fn = config, tokenizer, loss_fn
        self.rank = dist.get_rank() if is_distributed() else 0
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_data, self.eval_batches = train_data, eval_batches or []
        self.step, self.history = 0, []
        state = None
        if resume_from:  # weights go in before sharding; the rest after the optimizer exists
            state = self._read_checkpoint(resume_from, model)
        self.raw_model = model
        self.model = parallelize(model, self.device, config.parallel, config.compile, config.activation_checkpointing)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(s, config))
        self.expert_counter = ExpertCounter() if model.config.is_moe else None
        if state is not None:
            self._restore(state)
            if self.rank == 0:
                truncate_metrics(config.out_dir, self.step)
                print(f"resumed from step {self.step} (checkpoint {resume_from})")
        self.train_iter = iter(train_data)

    # --- setup ---
    def _make_optimizer(self):
        decay, no_decay = [], []
        # norms that ask for it (Qwen3-Next's zero-centred ones) decay too
        decayed_norms = {f"{n}.weight" for n, m in self.raw_model.named_modules() if getattr(m, "weight_decay", False)}
        for name, p in self.raw_model.named_parameters():  # tied lm_head is the embedding: listed once
            (decay if (p.ndim >= 2 and "embed_tokens" not in name) or name in decayed_norms else no_decay).append(p)
        groups = [dict(params=decay, weight_decay=self.config.weight_decay), dict(params=no_decay, weight_decay=0.0)]
        c = self.config
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=self.device.type == "cuda")

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # --- one optimizer step ---
    def train_step(self) -> dict:
        """grad_accum micro-batches, the loss normalised by the target tokens of the whole global batch (so N ranks
        with batch B compute exactly what one process with batch N*B computes), clip, step."""
        c = self.config
        self.model.train()
        batches = [_to_device(next(self.train_iter), self.device) for _ in range(c.grad_accum)]
        t0 = time.perf_counter()
        pairs = sum(attended_pairs(b) for b in batches if torch.is_tensor(b.get("input_ids"))) * self.world_size
        loss_sum, logged = torch.zeros((), device=self.device), {}  # logged: losses a loss_fn reports apart
        tokens = sum(b["input_ids"].numel() for b in batches if torch.is_tensor(b.get("input_ids"))) * self.world_size
        # each micro-batch weighs by its target tokens (a batch without labels: by 1, a mean of means)
        counts = [(b["labels"][:, 1:] != -100).sum().float() if torch.is_tensor(b.get("labels"))
                  else torch.ones((), device=self.device) for b in batches]
        total_targets = _all_reduce(torch.stack(counts).sum()).clamp(min=1)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else contextlib.nullcontext()
            with sync, self._autocast():
                loss, _, *parts = self.loss_fn(self.model, batch, self.expert_counter)
                (loss * counts[i] * self.world_size / total_targets).backward()  # DDP/FSDP average over ranks
            loss_sum += loss.detach().float() * counts[i]
            for name, value in (parts[0] if parts else {}).items():
                logged[name] = logged.get(name, 0) + value.detach().float() * counts[i]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else 1e30)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.expert_counter is not None:
            self.expert_counter.reset()
        loss_value = (_all_reduce(loss_sum) / total_targets).item()
        self.step += 1
        record = dict(step=self.step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), tokens=tokens,
                      train_flops=training_flops(self.raw_model.config, tokens, int(pairs)), dt=time.perf_counter() - t0)
        return record | {name: (_all_reduce(value) / total_targets).item() for name, value in logged.items()}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the held-out batches (each rank its own, weighted by target count)."""
        if not self.eval_batches:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for batch in self.eval_batches:
            batch = _to_device(batch, self.device)
            with self._autocast():
                loss, n = self.loss_fn(self.model, batch, None)[:2]
            total, count = total + loss.float() * n, count + n
        self.model.train()
        return (_all_reduce(total) / _all_reduce(count).clamp(min=1)).item()

    # --- the loop ---
    def train(self) -> list[dict]:
        c, main = self.config, self.rank == 0
        peak = device_peak(self.device)
        bar = _progress_bar(c.steps, self.step) if main and c.progress else None
        loggers = _experiment_loggers(c) if main else []
        started, start_step = time.perf_counter(), self.step
        while self.step < c.steps and not self.budget_spent():
            record = self.train_step()
            record["tok_per_s"] = record["tokens"] / record["dt"]
            record.setdefault("flops", record["train_flops"])  # MeteredTrainer's already count generation too
            record["mfu"] = record["train_flops"] / record["dt"] / peak[1] / self.world_size if peak else None
            record["time"] = time.time()  # wall clock: when the step ended (a stage's time to first step)
            at_end = self.step == c.steps or self.budget_spent()
            if (c.eval_every and self.step % c.eval_every == 0) or at_end:
                record["val_loss"] = self.evaluate()
            self.history.append(record)
            if main:
                self._log(record, bar, loggers, started, start_step)
            if (c.save_every and self.step % c.save_every == 0) or at_end:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if main and self.history:
            plot_losses(os.path.join(c.out_dir, "metrics.jsonl"), os.path.join(c.out_dir, "loss.png"))
        for logger in loggers:
            logger.close()
        return self.history

    def budget_spent(self) -> bool:
        """Whether a compute budget (MeteredTrainer's max_flops) ends the run before its last step."""
        return False

    def _log(self, r: dict, bar, loggers, started: float, start_step: int) -> None:
        c = self.config
        os.makedirs(c.out_dir, exist_ok=True)
        with open(os.path.join(c.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
        for logger in loggers:
            logger.log(r)
        if bar is not None:
            bar.update(1)
        if r["step"] % c.log_every and r["step"] != c.steps and "val_loss" not in r:
            return
        eta = (time.perf_counter() - started) / (r["step"] - start_step) * (c.steps - r["step"])
        line = (f"step {r['step']:6d}/{c.steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm "
                f"{r['grad_norm']:.3f} | {r['tok_per_s']:,.0f} tok/s | MFU "
                + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a") + f" | ETA {_duration(eta)}"
                + (f" | mtp loss {r['mtp_loss']:.4f}" if "mtp_loss" in r else "")
                + (f" | val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""))
        (bar.write if bar is not None else print)(line)

    # --- checkpoints ---
    def save_checkpoint(self) -> str | None:
        """Gather full tensors to rank 0 and write OUT/step_NNNNNN atomically; returns its path on rank 0."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        module = self.raw_model
        if is_distributed():
            weights = get_model_state_dict(module, options=options)
            optimizer = get_optimizer_state_dict(module, self.optimizer, options=options)
            rng = [None] * self.world_size
            dist.all_gather_object(rng, _rng_state())
        else:
            weights, optimizer, rng = None, get_optimizer_state_dict(module, self.optimizer, options=options), \
                [_rng_state()]
        path = None
        if self.rank == 0:
            model = module
            if weights is not None:  # a plain CPU copy in the HF layout
                with torch.device("meta"):
                    model = model_class(module.config)(module.config)
                model.load_state_dict(weights, assign=True)
                model.tie_weights()
            data = self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None
            state = dict(step=self.step, optimizer=optimizer, scheduler=self.scheduler.state_dict(), data=data,
                         rng=rng, train_config=asdict(self.config), history=self.history) | self.extra_state()
            path = write_checkpoint(self.config.out_dir, self.step, model, state, self.tokenizer,
                                    self.config.keep_checkpoints)
        if is_distributed():
            dist.barrier()
        return path

    def _read_checkpoint(self, path: str, model) -> dict:
        state_file = os.path.join(path, "trainer_state.pt")
        if not os.path.exists(state_file):
            raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.pt)")
        check_compatible(path, model.config)
        saved = load_model(path, dtype=torch.float32)
        model.load_state_dict(saved.state_dict())
        return torch.load(state_file, map_location="cpu", weights_only=False)

    def _restore(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        if state["data"] is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data"])
        rng = state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng)
        self.step, self.history = state["step"], state.get("history", [])

    def extra_state(self) -> dict:
        """What a subclass adds to trainer_state.pt (read back from `state` by its own _restore)."""
        return {}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


METRICS_FILES = ("metrics.jsonl", "rl_metrics.jsonl")  # per-step records that a stage appends to in OUT


def truncate_metrics(out_dir: str, step: int) -> None:
    """On resume: drop the records past the checkpoint's step (a crashed run wrote them; the resumed run writes
    them again), so sums and plots count each step once. Each file is replaced atomically."""
    for name in METRICS_FILES:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and _record_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write(path, "".join(kept).encode())


def _record_step(line: str) -> float:
    """A metrics record's step; a torn last line (the crash cut it) counts as past every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def resume_checkpoint(out_dir: str) -> str:
    """The checkpoint that --resume continues from: OUT's latest, or one line saying there is none yet."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (a run stopped before its first save leaves "
                                f"none): rerun without --resume to start it afresh")
    return path


def check_compatible(path: str, config) -> None:
    """A checkpoint resumes only into a model of the same shape; one clear line names the first difference."""
    from ..config import Qwen3Config
    saved = Qwen3Config.from_json(path)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size", "tie_word_embeddings"):
        if getattr(saved, field) != getattr(config, field):
            raise ValueError(f"checkpoint {path} is incompatible with this model: {field} is "
                             f"{getattr(saved, field)} there, {getattr(config, field)} here")


def write_checkpoint(out_dir: str, step: int, model, state: dict, tokenizer=None, keep: int = 2) -> str:
    """Model (HF layout), tokenizer and trainer_state.pt into a temporary folder, fsync, rename, repoint `latest`."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # left behind by a crash during an earlier write
        if stale.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    name = f"step_{step:06d}"
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-step_")
    os.chmod(tmp, 0o755)
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    for file in os.listdir(tmp):
        with open(os.path.join(tmp, file), "rb") as f:
            os.fsync(f.fileno())
    final = os.path.join(out_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    atomic_write(os.path.join(out_dir, "latest"), (name + "\n").encode())
    steps = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and d != name)
    for old in steps[:max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False)


def _experiment_loggers(c: TrainConfig) -> list:
    """wandb and tensorboard, when asked for and installed (both off by default)."""
    loggers = []
    if c.wandb_project:
        try:
            import wandb
            run = wandb.init(project=c.wandb_project, config=asdict(c))
            loggers.append(type("W", (), dict(log=lambda self, r: run.log(r, step=r["step"]),
                                              close=lambda self: run.finish()))())
        except ImportError:
            print("wandb is not installed: logging to metrics.jsonl only")
    if c.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(c.out_dir, "tensorboard"))
            loggers.append(type("T", (), dict(
                log=lambda self, r: [writer.add_scalar(k, v, r["step"]) for k, v in r.items()
                                     if isinstance(v, float)], close=lambda self: writer.close()))())
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only")
    return loggers


def plot_losses(metrics_file: str, png_file: str) -> None:
    """Training and held-out loss against step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = {}
    with open(metrics_file) as f:
        for line in f:  # one record per step (a resume truncates the file); were there two, the last wins
            r = json.loads(line)
            records[r["step"]] = r
    steps = sorted(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [records[s]["loss"] for s in steps], label="train")
    val = [s for s in steps if "val_loss" in records[s]]
    if val:
        ax.plot(val, [records[s]["val_loss"] for s in val], "o-", label="held-out")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    plt.close(fig)


# --- compute accounting ---

TOKEN_KEYS = ("generated_tokens", "prompt_tokens", "scored_tokens", "trained_tokens")
FLOPS_KEYS = ("generation_flops", "scoring_flops", "training_flops")


def forward_flops(config, lengths) -> float:
    """FLOPs of forward passes over sequences of these lengths (a third of flops_per_token: no backward)."""
    return sum(n * flops_per_token(config, n) / 3 for n in lengths)


class Compute:
    """Tokens and FLOPs spent by a run. Data sources charge generation and scoring as they happen; each training step
    takes the charges made since the previous one (`step`) and the totals are written to OUT/compute.json."""

    def __init__(self, out_dir: str | None = None, resume: bool = False):
        self.path = os.path.join(out_dir, "compute.json") if out_dir else None
        self.totals = dict.fromkeys(TOKEN_KEYS + FLOPS_KEYS, 0) | dict(tokens=0, flops=0, steps=0)
        if resume and self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.totals.update(json.load(f))
        self.pending = dict.fromkeys(TOKEN_KEYS + FLOPS_KEYS, 0)

    def generate(self, config, prompt_lengths: list[int], completion_lengths: list[int]) -> None:
        """The engine prefilled these prompts and sampled these completions with a model of this config."""
        self.pending["prompt_tokens"] += sum(prompt_lengths)
        self.pending["generated_tokens"] += sum(completion_lengths)
        self.pending["generation_flops"] += forward_flops(config, [p + c for p, c in zip(prompt_lengths,
                                                                                         completion_lengths)])

    def score(self, config, shapes) -> None:
        """No-grad forwards over batches of these (rows, width) shapes."""
        self.pending["scored_tokens"] += sum(b * t for b, t in shapes)
        self.pending["scoring_flops"] += sum(b * forward_flops(config, [t]) for b, t in shapes)

    def train(self, config, shapes) -> None:
        """Forward + backward over batches of these (rows, width) shapes."""
        self.pending["trained_tokens"] += sum(b * t for b, t in shapes)
        self.pending["training_flops"] += sum(3 * b * forward_flops(config, [t]) for b, t in shapes)

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write(self.path, (json.dumps(self.totals, indent=2) + "\n").encode())

    def step(self, world_size: int = 1, write: bool = True) -> dict:
        """Close a training step: its charges (times the ranks, each of which did the same) join the totals. Returns
        the step's counts and FLOPs and the running total, for its metrics record."""
        step = {k: v * world_size for k, v in self.pending.items()}
        self.pending = dict.fromkeys(self.pending, 0)
        for k, v in step.items():
            self.totals[k] += v
        self.totals["tokens"] = sum(self.totals[k] for k in TOKEN_KEYS)
        self.totals["flops"] = sum(self.totals[k] for k in FLOPS_KEYS)
        self.totals["steps"] += 1
        if write:
            self.save()
        record = {k: step[k] for k in TOKEN_KEYS}
        return record | dict(flops=sum(step[k] for k in FLOPS_KEYS), total_flops=self.totals["flops"])


class MeteredTrainer(Trainer):
    """The Trainer with compute accounting: each step's metrics record gains the tokens and FLOPs of the micro-batches
    it trained on plus what the data source charged to `compute` while producing them (see Compute)."""

    def __init__(self, *args, compute: Compute, **kwargs):
        self.compute = compute  # before the Trainer's __init__: a resume restores its totals
        super().__init__(*args, **kwargs)

    def extra_state(self) -> dict:
        return dict(compute=dict(self.compute.totals))

    def _restore(self, state: dict) -> None:
        super()._restore(state)
        if "compute" in state:  # the totals at the checkpoint: compute.json also counted the steps after it
            self.compute.totals = dict(state["compute"])
            if self.rank == 0:
                self.compute.save()

    def train_step(self) -> dict:
        shapes, source = [], self.train_iter
        self.train_iter = _recording_shapes(source, shapes)
        try:
            record = super().train_step()
        finally:
            self.train_iter = source
        self.compute.train(self.raw_model.config, shapes)
        return record | self.compute.step(self.world_size, write=self.rank == 0)

    def budget_spent(self) -> bool:
        return self.config.max_flops is not None and self.compute.totals["flops"] >= self.config.max_flops


def _recording_shapes(batches, shapes: list):
    for batch in batches:
        shapes.append(tuple(batch["input_ids"].shape))
        yield batch
