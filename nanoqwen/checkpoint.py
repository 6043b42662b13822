"""HF checkpoint folders in and out: config.json + model.safetensors (or shards with model.safetensors.index.json).

Weights are read only with safetensors (never unpickled). Loading builds the model on the meta device, allocates it
once on the target device and fills it tensor by tensor, so peak memory stays near the model's size. Writes are atomic
(temporary name, fsync, rename), so an interrupted save never leaves a half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path, atomic_write
from .config import Qwen3Config, get_preset, with_overrides
from .config import long_context as config_long_context
from .model import Qwen3ForCausalLM
from .qwen3_next import Qwen3NextForCausalLM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_slot(name: str, intermediate_size: int):
    """Map an HF per-expert tensor name to (our stacked parameter, index into it), or None for other names.

    HF files keep `mlp.experts.{e}.{gate,up,down}_proj.weight`; we stack them as `experts.gate_up_proj[e]`
    (gate rows first, then up rows) and `experts.down_proj[e]`."""
    m = _EXPERT.match(name)
    if not m:
        return None
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return f"{prefix}.down_proj", (e,)
    rows = slice(0, intermediate_size) if proj == "gate_proj" else slice(intermediate_size, 2 * intermediate_size)
    return f"{prefix}.gate_up_proj", (e, rows)


def model_class(config: Qwen3Config) -> type[Qwen3ForCausalLM]:
    """The model class for a config: Qwen3NextForCausalLM for the hybrid, else Qwen3ForCausalLM (dense and MoE)."""
    return Qwen3NextForCausalLM if config.is_hybrid else Qwen3ForCausalLM


def hf_state_items(model: Qwen3ForCausalLM):
    """Yield (HF name, tensor) for every tensor an HF checkpoint of this model holds (experts unstacked)."""
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix, I = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :I]
                yield f"{prefix}.{e}.up_proj.weight", t[e, I:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


# ----------------------------------------------------------------------------------------------------------------
# Loading

def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ValueError(f"{path} holds only pickle weights (.bin/.pt); nanoqwen loads safetensors only "
                         "(convert them with a trusted tool first)")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _tensor_names(files: list[str]) -> list[str]:
    names = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            names += list(f.keys())
    return names


def load_model(path_or_preset: str, dtype=None, device=None, **config_overrides) -> Qwen3ForCausalLM:
    """A model from an HF checkpoint folder, or a randomly initialised one from a preset name.

    dtype None: the checkpoint's own dtype (config torch_dtype), fp32 for presets. device None: CPU."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device or "cpu")
    if not os.path.isdir(path_or_preset):
        if os.path.exists(path_or_preset):
            raise ValueError(f"{path_or_preset} is a file; pass the checkpoint folder that holds config.json")
        if "/" in path_or_preset or path_or_preset.startswith("."):
            raise FileNotFoundError(f"no checkpoint folder at {path_or_preset}")
        config = get_preset(path_or_preset, **config_overrides)
        with torch.device("meta"):
            model = model_class(config)(config)
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights()
        return model.to(dtype or torch.float32)

    config = Qwen3Config.from_json(path_or_preset)
    if config_overrides:  # checked as the file's own fields are
        config = with_overrides(config, **config_overrides)
    files = _weight_files(path_or_preset)
    if config.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in _tensor_names(files)):
        # a config that declares the MTP head over weights saved without it (transformers drops `mtp.*`)
        config = with_overrides(config, num_nextn_predict_layers=0)
    dtype = dtype or _DTYPES.get(str(config.torch_dtype).replace("torch.", ""), torch.float32)
    with torch.device("meta"):
        model = model_class(config)(config)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    unfilled = {n: p.numel() for n, p in params.items()}
    if config.tie_word_embeddings:
        unfilled.pop("lm_head.weight", None)

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                slot = expert_slot(name, config.moe_intermediate_size)
                target_name, index = slot if slot else (name, ())
                if target_name not in params:
                    if config.tie_word_embeddings and name == "lm_head.weight":
                        continue  # a tied checkpoint that also stores the head: the embedding is the weight
                    if config.is_hybrid and not config.num_nextn_predict_layers and name.startswith("mtp."):
                        continue  # an MTP head the config.json does not declare (no mtp_num_hidden_layers): left out
                    raise KeyError(f"{file}: unexpected tensor {name!r} (not part of a {config.model_type} model "
                                   f"with this config.json)")
                target = params[target_name][index] if index else params[target_name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config.json "
                                     f"implies {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor)
                unfilled[target_name] = unfilled.get(target_name, 0) - tensor.numel()
    missing = sorted(n for n, left in unfilled.items() if left > 0)
    if missing:
        raise KeyError(f"{path_or_preset}: tensors missing from the checkpoint: {missing[:8]}"
                       + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return model


def load(path: str, dtype=None, device=None, long_context: dict | None = None):
    """(model, tokenizer) from a checkpoint folder (model and tokenizer files side by side), ready to generate.
    long_context: config.long_context's keyword arguments (dual_chunk=CHUNK, yarn=FACTOR, context=N), to run past
    the trained length.

    device None: CUDA when available. dtype None: the checkpoint's, but bf16 instead of fp32 on CUDA. A folder
    without tokenizer files gets the official Qwen3 tokenizer if the model has its vocabulary. A training run's
    folder (a `latest` file naming its newest checkpoint) loads that checkpoint."""
    from safetensors import SafetensorError
    from .tokenizer import load_tokenizer
    if not os.path.exists(os.path.join(path, "config.json")):
        path = resolve(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and str(device).startswith("cuda") and os.path.isdir(path):
        dtype = "bfloat16" if Qwen3Config.from_json(path).torch_dtype in (None, "float32") else None
    overrides = {}
    if long_context and os.path.isdir(path):
        overrides = config_long_context(Qwen3Config.from_json(path), **long_context)
    try:
        model = load_model(path, dtype=dtype, device=device, **overrides).eval()
    except SafetensorError as error:
        raise ValueError(f"{path}: cannot read the weights: {error}") from None
    has_tokenizer = os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                                for f in ("tokenizer.json", "vocab.json"))
    if has_tokenizer:
        return model, load_tokenizer(path)
    if model.config.vocab_size >= 151669 or not os.path.isdir(path):
        return model, load_tokenizer()
    raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json) and its vocabulary is not Qwen3's")


# ----------------------------------------------------------------------------------------------------------------
# Saving

def _atomic_save_tensors(tensors: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"bad shard size {size!r}; use e.g. '5GB', '500MB' or a byte count")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_model(model: Qwen3ForCausalLM, path: str, max_shard_size="5GB", dtype=None) -> None:
    """Write the HF layout (config.json + model.safetensors, or shards and an index above max_shard_size)."""
    os.makedirs(path, exist_ok=True)
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    limit = _parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in hf_state_items(model):
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    config = model.config
    config.torch_dtype = str(dtype or model.lm_head.weight.dtype).replace("torch.", "")
    if len(shards) == 1:
        written = ["model.safetensors"]
        _atomic_save_tensors(shards[0], os.path.join(path, "model.safetensors"))
    else:
        weight_map, total, written = {}, 0, ["model.safetensors.index.json"]
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_tensors(shard, os.path.join(path, fname))
            weight_map.update({n: fname for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            written.append(fname)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(os.path.join(path, "model.safetensors.index.json"), json.dumps(index, indent=2).encode())
    # only now that the new weights are complete: a previous save with another shard count leaves no stale files
    for old in os.listdir(path):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old) and old not in written:
            os.unlink(os.path.join(path, old))
    config.save(path)
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    if config.vocab_size < 151643:  # a small model with its own trained tokenizer: special ids come from it
        generation = {k: v for k, v in generation.items() if not k.endswith("token_id")}
    atomic_write(os.path.join(path, "generation_config.json"), json.dumps(generation, indent=2).encode())


def latest_checkpoint(out_dir: str) -> str | None:
    """The folder OUT/latest names, or None."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, f.read().strip())
    return path if os.path.isdir(path) else None


def resolve(path: str) -> str:
    """A checkpoint folder, or a run folder whose `latest` names one."""
    return latest_checkpoint(path) or path
