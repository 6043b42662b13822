"""nanoqwen: a complete, fast and readable implementation of the Qwen3 system.

Public names are imported lazily, so `import nanoqwen.tokenizer` (e.g. in data workers) does not pay for torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Qwen3Config": "config", "get_preset": "config", "PRESETS": "config",
    "Qwen3ForCausalLM": "model", "Qwen3NextForCausalLM": "qwen3_next",
    "load_model": "checkpoint", "save_model": "checkpoint",
    "load": "checkpoint", "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "generate": "generation", "generate_batch": "generation", "Engine": "generation",
    "GenerationResult": "generation", "Chunk": "generation", "Request": "generation",
    "SamplingParams": "generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoqwen' has no attribute {name!r}")
