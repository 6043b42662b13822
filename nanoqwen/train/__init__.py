"""Training: one Trainer core (trainer.py), parallelism applied from outside (parallelize.py), and the three
pre-training stages of the Qwen3 report (pretrain.py)."""
from ..checkpoint import latest_checkpoint
from .trainer import TrainConfig, Trainer, lm_loss, lr_multiplier

__all__ = ["TrainConfig", "Trainer", "latest_checkpoint", "lm_loss", "lr_multiplier"]
