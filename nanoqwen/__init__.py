"""nanoqwen: a complete, fast and readable implementation of the Qwen3 system."""
from .config import PRESETS, Qwen3Config, get_preset
from .model import Qwen3ForCausalLM
from .checkpoint import load_model, save_model

__version__ = "0.1.0"
