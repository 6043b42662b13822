"""Stage options: each stage of the recipe is one dataclass whose fields are its settings, with their defaults, help
and checks in one place. `nanoqwen <stage>` builds its flags from it (add_arguments), the speedrun builds the same
objects, and `to_argv` writes the command line that reproduces one.

    @dataclass(kw_only=True)
    class SFTOptions(RunOptions, TaskOptions):
        stage: str = option(help="coldstart or fusion", choices=["coldstart", "fusion"])
        steps: int = option(200, "optimizer steps", check=POSITIVE)
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

POSITIVE = (lambda v: v > 0, "a positive integer")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")


def option(default=MISSING, help: str = "", *, type=None, choices=None, check=None, flag: str | None = None,
           append: bool = False, cli: bool = True, metavar: str | None = None):
    """A dataclass field with what the command line needs: help, the value's type, allowed choices or a check
    (predicate, requirement), a flag name other than --field-name, repeatable (append), or not a flag at all."""
    return field(default=default, metadata=dict(help=help, type=type, choices=choices, check=check, flag=flag,
                                                append=append, cli=cli, metavar=metavar))


@dataclass(kw_only=True)
class RunOptions:
    """What every training stage takes."""
    out: str = option(help="run folder: step_* checkpoints, `latest`, metrics.jsonl")
    seed: int = option(0, "seed of the data order, sampling and initialisation")
    log_every: int = option(10, "a log line every N steps", check=POSITIVE)
    save_every: int = option(0, "a checkpoint every N steps (0: at the end only)", check=AT_LEAST_0)
    progress: bool = option(True, "no tqdm bar", flag="--no-progress")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")


@dataclass(kw_only=True)
class TaskOptions:
    """Stages that build their data from the embedded task generators."""
    samples: int = option(512, "generated problems (when no data file is given)", check=POSITIVE)
    tasks: str | None = option(None, "task families, comma-separated (default: all)")
    difficulty: str | None = option("1-5", "N or LO-HI")
    languages: str | None = option(None, "comma-separated: en,zh,fr (default: all)")

    def task_filter(self) -> dict:
        from ..tasks import parse_filter
        return parse_filter(self.tasks, self.difficulty, self.languages)


def model_lr(lr: float | None, config, nano: float, released: float) -> float:
    """An explicit learning rate, or a stage's default for this model: `nano` for widths up to 768 (the nano presets),
    `released` for the released shapes (hidden size 1024 and up), whose pre-trained weights a large LR would undo."""
    return lr if lr is not None else (nano if config.hidden_size <= 768 else released)


def number(kind, check):
    """An argparse type: a number of `kind` for which check[0](value) holds, else a one-line error."""
    ok, requirement = check

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _cli_fields(cls):
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the options class `cls`, the required ones first; help says each default."""
    required = lambda f: f.default is MISSING and f.default_factory is MISSING  # noqa: E731
    for f in sorted(_cli_fields(cls), key=lambda f: not required(f)):
        meta, kwargs = f.metadata, dict(help=f.metadata.get("help") or "", dest=f.name)
        if required(f):
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()
            if kwargs["default"] not in (None, False, True, ()) and "default" not in kwargs["help"]:
                kwargs["help"] += f" (default: {kwargs['default']})"
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kind = meta.get("type") or (type(meta["choices"][0]) if meta.get("choices") else str if
                                        f.default in (None, MISSING) or meta.get("append") else type(f.default))
            kind = kind if isinstance(kind, type) else str
            kwargs["type"] = number(kind, meta["check"]) if meta.get("check") else kind
            kwargs.update({k: meta[k] for k in ("choices", "metavar") if meta.get(k)})
            if meta.get("append"):
                kwargs["action"], kwargs["default"] = "append", None
        parser.add_argument(_flag(f), **kwargs)


def from_args(cls, args: argparse.Namespace):
    """The options object of parsed command-line arguments."""
    values = {f.name: getattr(args, f.name) for f in _cli_fields(cls)}
    for f in _cli_fields(cls):
        if f.metadata.get("append") and values[f.name] is None:
            values[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return cls(**values)


def to_argv(options) -> list[str]:
    """The flags that reproduce `options` (defaults left out), e.g. for printing `$ nanoqwen sft ...`."""
    argv = []
    for f in _cli_fields(type(options)):
        value = getattr(options, f.name)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not
                                                               MISSING else MISSING)
        if value == default and default is not MISSING:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f))
        elif f.metadata.get("append"):
            for item in value:
                argv += [_flag(f), str(item)]
        elif value is not None:
            argv += [_flag(f), repr(value) if isinstance(value, float) else str(value)]
    return argv
