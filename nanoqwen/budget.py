"""The speedrun's time budget: a short calibration of this machine, then each stage's share of the minutes as its
steps, samples and rollouts.

    SHARES        the fraction of the budget each stage gets (one table, below)
    calibrate()   this machine's speeds for one preset: training tokens/s at the pre-training shapes (S1 and the
                  long S3 rows) and the engine's generation tokens/s at the rollout batch
    choose_models()  the teacher is the largest candidate whose S1 share buys it TOKENS_PER_WEIGHT training tokens per
                  non-embedding weight (a bigger budget buys a bigger teacher); the student is the largest preset with
                  at most a quarter of the teacher's weights
    Work          what one unit of a stage's size costs (tokens trained, generated, scored); a stage of size n takes
                  FIXED_SECONDS + n x Work.seconds(speed), so its seconds give its size

Before each stage the speedrun sizes it from the time still left: its share of what remains, times the ratio of
measured to predicted time of the stages done so far (`correction`), so a slow stage is paid for by the later ones.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

SHARES = {  # stage (or group of stages): share of the budget; a scale without the MoE comparison drops its row
    "teacher-s1": 0.18, "teacher-s2": 0.12, "teacher-s3": 0.08, "moe-s1": 0.08,
    "coldstart": 0.05, "rl": 0.12, "fusion": 0.10, "rm": 0.03, "general": 0.03,
    "student-s1": 0.04, "student-s2": 0.02, "distill-off": 0.04, "distill-on": 0.03, "student-rl": 0.03,
    "eval-base": 0.02, "eval-long": 0.01, "eval": 0.10,  # completion checks, long-context checks, chat evaluations
}
TOKENS_PER_WEIGHT = 0.25  # S1 tokens per non-embedding weight the teacher must get (nano-d4 on 2 cores in 30 min)
FIXED_SECONDS = {"cpu": 3.0, "cuda": 15.0}  # per stage: loading, data, warm-up (compilation on a GPU)


@dataclass
class Speed:
    """Tokens per second of one model on this machine."""
    train: float   # forward + backward, pre-training rows
    long: float    # forward + backward, stage-3 rows
    generate: float  # the engine, batched

    def seconds(self, train=0.0, long=0.0, generate=0.0, score=0.0) -> float:
        """Seconds for that many tokens; a no-grad forward costs a third of a training step."""
        return train / self.train + long / self.long + generate / self.generate + score / (3 * self.train)


@dataclass
class Work:
    """What one unit of a stage's size (a step, a problem) costs, in tokens; `model` names whose speed applies, and
    `other` the second model a stage runs (a teacher scoring or answering, a judge)."""
    model: str
    train: float = 0.0
    long: float = 0.0
    generate: float = 0.0
    score: float = 0.0
    other_generate: float = 0.0
    other_score: float = 0.0
    other: str | None = None

    def seconds(self, speeds: dict) -> float:
        own = speeds[self.model].seconds(self.train, self.long, self.generate, self.score)
        if self.other is None:
            return own
        return own + speeds[self.other].seconds(generate=self.other_generate, score=self.other_score)


def calibrate(preset: str, vocab_size: int, batch: int, seq_len: int, long_seq_len: int, rollout_batch: int,
              device) -> Speed:
    """Training throughput at (batch, seq_len) and at stage 3's (batch / 8, long_seq_len), and generation throughput
    of the engine with rollout_batch rows (64-token prompts, 32 new tokens), on a randomly initialised model of the
    preset."""
    import itertools

    import torch

    from . import data
    from .checkpoint import load_model
    from .config import padded_vocab_size
    from .generation import generate_batch
    from .tokenizer import train_tokenizer
    torch.manual_seed(0)
    model = load_model(preset, vocab_size=padded_vocab_size(vocab_size), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_speed(rows: int, length: int, repeats: int) -> float:
        x = torch.randint(0, vocab_size, (rows, length), device=device)
        timings = []
        for _ in range(repeats + 1):  # the first step warms up (allocations, kernels)
            start = _synchronized(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type
                                == "cuda"):
                model(x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timings.append(_synchronized(device) - start)
        return rows * length / min(timings[1:])

    train, long = train_speed(batch, seq_len, 1), train_speed(max(1, batch // 8), long_seq_len, 1)
    tokenizer = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 200), 300)
    model.eval()
    prompts = torch.randint(0, tokenizer.vocab_size, (rollout_batch, 64)).tolist()
    generate_batch(model, tokenizer, prompts[:2], max_new_tokens=4, temperature=1.0, seed=0)  # warm-up
    start = _synchronized(device)
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0, seed=0)
    seconds = _synchronized(device) - start
    return Speed(train=train, long=long, generate=sum(r.completion_tokens for r in results) / seconds)


def _synchronized(device) -> float:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def affords(preset: str, s1_seconds: float, speed: Speed) -> bool:
    """Whether stage 1's seconds give the preset TOKENS_PER_WEIGHT training tokens per non-embedding weight."""
    from .config import get_preset
    return s1_seconds * speed.train >= TOKENS_PER_WEIGHT * _non_embedding(get_preset(preset))


def choose_models(candidates: list[str], s1_seconds: float, speeds: dict) -> tuple[str, str]:
    """(teacher, student): the largest candidate teacher the budget affords (else the smallest), and the largest
    nano-dN with at most a quarter of its non-embedding weights."""
    from .config import SMALL_PRESETS, get_preset
    weights = lambda name: _non_embedding(get_preset(name))  # noqa: E731
    teacher = candidates[0]
    for name in candidates:
        if affords(name, s1_seconds, speeds[name]):
            teacher = name
    dense = sorted((n for n in SMALL_PRESETS if n.startswith("nano-d")), key=weights)
    students = [n for n in dense if 4 * weights(n) <= weights(teacher)] or dense[:1]
    return teacher, students[-1]


def _non_embedding(config) -> int:
    return config.num_parameters() - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings
                                                                                 else 2)


def size_for(seconds: float, stages: int, unit_seconds: float, device_type: str, minimum: int) -> int:
    """The size (steps, problems) that `stages` stages costing unit_seconds per unit together fit in `seconds`."""
    usable = seconds - stages * FIXED_SECONDS[device_type]
    return max(minimum, int(usable / unit_seconds))


def predicted_seconds(size: int, unit_seconds: float, device_type: str) -> float:
    return FIXED_SECONDS[device_type] + size * unit_seconds


def speeds_from(record: dict) -> dict:
    return {name: Speed(**values) for name, values in record.items()}


def speeds_record(speeds: dict) -> dict:
    return {name: asdict(speed) for name, speed in speeds.items()}
