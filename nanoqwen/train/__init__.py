"""Training: one Trainer core (trainer.py), parallelism applied from outside (parallelize.py), and one short module
per stage of the Qwen3 recipe. Each stage module has an options dataclass (its settings and defaults, the one place
they are defined) and a `run(options)`; `nanoqwen <command>` and the speedrun both go through STAGE_COMMANDS."""
import importlib

from ..checkpoint import latest_checkpoint
from .trainer import TrainConfig, Trainer, lm_loss, lr_multiplier

STAGE_COMMANDS = {  # command: (module in nanoqwen.train, options class, help)
    "pretrain": ("pretrain", "PretrainOptions", "one pre-training stage (1 general, 2 reasoning, 3 long context)"),
    "sft": ("sft", "SFTOptions", "post-training SFT: long-CoT cold start or thinking-mode fusion"),
    "rl": ("grpo", "RLOptions", "GRPO: reasoning RL or general RL"),
    "rm": ("reward_model", "RMOptions", "train a reward model on preference pairs (Bradley-Terry)"),
    "distill": ("distill", "DistillOptions", "strong-to-weak distillation: off-policy (SFT on teacher answers) or "
                                             "on-policy"),
    "eval": ("evaluate", "EvalOptions", "held-out accuracy, ThinkFollow and the thinking-budget curve; base-model "
                                        "suites"),
}


def stage_command(command: str):
    """(run function, options class) of a stage command."""
    module_name, class_name, _ = STAGE_COMMANDS[command]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module.run, getattr(module, class_name)


__all__ = ["STAGE_COMMANDS", "TrainConfig", "Trainer", "latest_checkpoint", "lm_loss", "lr_multiplier",
           "stage_command"]
