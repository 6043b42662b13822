"""Model configuration with the HF `config.json` field names, plus presets for every released Qwen3 model and small ones.

One dataclass covers the three model types: `qwen3` (dense), `qwen3_moe` and `qwen3_next` (the hybrid: Gated DeltaNet
and gated attention layers, MoE with a shared expert).

A released checkpoint's config.json loads with no translation table: unknown keys are ignored, missing keys take the
defaults transformers uses for that `model_type`. Both the original names (`rope_theta`, `rope_scaling`, `num_experts`)
and the transformers-v5 names (`rope_parameters`, `num_local_experts`, `dtype`) are read; the original names are written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .atomic import atomic_write


@dataclass
class Qwen3Config:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = 128  # None means hidden_size // num_attention_heads (the MoE config's default)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    # Dual Chunk Attention (model.py): {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings":
    # 262144} as the released long-context checkpoints write it; None: plain attention
    dual_chunk_attention_config: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # MoE (model_type "qwen3_moe"); num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    # Qwen3-Next (model_type "qwen3_next"): layer i is "linear_attention" (Gated DeltaNet) or "full_attention"
    layer_types: list | None = None  # None: every full_attention_interval-th layer is full attention
    full_attention_interval: int = 4
    partial_rotary_factor: float = 1.0  # the share of head_dim that RoPE rotates (Next: 0.25)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    shared_expert_intermediate_size: int = 0
    # multi-token prediction (Qwen3-Next's `mtp.*` head; released config.json files call the count
    # mtp_num_hidden_layers): layers of the head, and the weight of its loss beside the next-token loss in training
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self):
        check_fields(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ValueError(f"hidden_size ({self.hidden_size}) // num_attention_heads "
                                 f"({self.num_attention_heads}) gives head_dim 0: set head_dim, or fewer heads")
        if self.is_hybrid:
            if self.layer_types is None:
                self.layer_types = ["full_attention" if (i + 1) % self.full_attention_interval == 0
                                    else "linear_attention" for i in range(self.num_hidden_layers)]
            if len(self.layer_types) != self.num_hidden_layers or \
                    set(self.layer_types) - {"linear_attention", "full_attention"}:
                raise ValueError(f"layer_types must list 'linear_attention' or 'full_attention' for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                                 f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.num_nextn_predict_layers and not self.is_hybrid:
            raise ValueError(f"num_nextn_predict_layers = {self.num_nextn_predict_layers}: the multi-token-prediction "
                             "head is part of qwen3_next models only")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Qwen3 uses 'silu')")
        if any(not 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
            raise ValueError(f"mlp_only_layers = {self.mlp_only_layers}: each must be a layer index in "
                             f"0..{self.num_hidden_layers - 1}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "yarn"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (use 'yarn' or none)")
            factor = self.rope_scaling.get("factor")
            if kind == "yarn" and not (_is_number(factor) and factor > 0):
                raise ValueError(f"rope_scaling factor = {factor!r}: yarn needs a number > 0")
        if self.dual_chunk_attention_config is not None:
            check_dual_chunk(self)

    # --- derived facts ---
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_hybrid(self) -> bool:
        """Qwen3-Next: Gated DeltaNet layers between gated full-attention layers."""
        return self.model_type == "qwen3_next"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the DeltaNet conv: [q | k | v] of all heads."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def trained_length(self) -> int:
        """The context the weights were trained at: Dual Chunk Attention's or YaRN's original_max_position_embeddings
        when set (then max_position_embeddings is the extended context), else max_position_embeddings."""
        dual_chunk, scaling = self.dual_chunk_attention_config or {}, self.rope_scaling or {}
        if dual_chunk.get("original_max_position_embeddings"):
            return dual_chunk["original_max_position_embeddings"]
        if scaling.get("rope_type", scaling.get("type")) == "yarn" and scaling.get("original_max_position_embeddings"):
            return scaling["original_max_position_embeddings"]
        return self.max_position_embeddings

    def is_linear_layer(self, layer_idx: int) -> bool:
        return self.is_hybrid and self.layer_types[layer_idx] == "linear_attention"

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Layer i uses MoE iff not in mlp_only_layers and (i+1) % decoder_sparse_step == 0 (as transformers)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    # --- HF config.json in and out ---
    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a JSON {_json_kind(d)}")
        d = dict(d)
        model_type = d.get("model_type", "qwen3")
        base = dict({"qwen3_moe": _MOE_DEFAULTS, "qwen3_next": _NEXT_DEFAULTS}.get(model_type, {}))
        if "num_local_experts" in d and "num_experts" not in d:
            d["num_experts"] = d["num_local_experts"]
        if "mtp_num_hidden_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["mtp_num_hidden_layers"]
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        rope_parameters = d.get("rope_parameters")
        if isinstance(rope_parameters, dict):  # transformers v5 keeps theta and scaling in one dict
            d.setdefault("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            if "partial_rotary_factor" in rope_parameters:
                d.setdefault("partial_rotary_factor", rope_parameters["partial_rotary_factor"])
            if rope_parameters.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        names = {f.name for f in dataclasses.fields(cls)}
        base.update({k: v for k, v in d.items() if k in names})
        return cls(**base)

    @classmethod
    def from_json(cls, path: str) -> "Qwen3Config":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                fields = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(fields)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["dual_chunk_attention_config"] is None:  # written only when set, as the released checkpoints do
            del d["dual_chunk_attention_config"]
        if self.is_hybrid:
            d["architectures"] = ["Qwen3NextForCausalLM"]
            d["mtp_num_hidden_layers"] = self.num_nextn_predict_layers  # the released files' name for it
            return d
        moe = self.is_moe
        d["architectures"] = ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"]
        d["model_type"] = "qwen3_moe" if moe else "qwen3"
        for k in _NEXT_ONLY_FIELDS + (() if moe else _MOE_ONLY_FIELDS):
            d.pop(k, None)
        return d

    def save(self, directory: str) -> None:
        atomic_write(os.path.join(directory, "config.json"),
                     (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())

    # --- sizes ---
    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count from the shapes alone (embeddings included, tied lm_head counted once)."""
        H, hd = self.hidden_size, self.head_dim
        query_heads = self.num_attention_heads * (3 if self.is_hybrid else 2)  # Next: q_proj also makes the gate
        attn = H * hd * (query_heads + self.num_key_value_heads * 2) + 2 * hd
        key_dim = self.linear_num_key_heads * self.linear_key_head_dim
        value_dim, nv = self.linear_num_value_heads * self.linear_value_head_dim, self.linear_num_value_heads
        linear = H * (2 * key_dim + 2 * value_dim + 2 * nv) + self.linear_conv_dim * self.linear_conv_kernel_dim \
            + 2 * nv + self.linear_value_head_dim + value_dim * H
        total = self.vocab_size * H * (1 if self.tie_word_embeddings else 2) + H
        for i in range(self.num_hidden_layers):
            if self.is_sparse_layer(i):
                experts = self.num_experts_per_tok if active_only else self.num_experts
                mlp = H * self.num_experts + experts * 3 * H * self.moe_intermediate_size
                if self.shared_expert_intermediate_size:
                    mlp += 3 * H * self.shared_expert_intermediate_size + H
            else:
                mlp = 3 * H * self.intermediate_size
            total += (linear if self.is_linear_layer(i) else attn) + mlp + 2 * H
        if self.num_nextn_predict_layers:  # the MTP head: two norms, fc (2H -> H), full-attention layers, a norm
            mlp = (H * self.num_experts + 3 * H * self.moe_intermediate_size *
                   (self.num_experts_per_tok if active_only else self.num_experts) +
                   (3 * H * self.shared_expert_intermediate_size + H if self.shared_expert_intermediate_size else 0)
                   ) if self.is_moe else 3 * H * self.intermediate_size
            total += 3 * H + 2 * H * H + self.num_nextn_predict_layers * (attn + mlp + 2 * H)
        return total


# What each field may hold: (check, what is allowed). A config is checked when it is made (read from config.json,
# a preset, a preset with overrides), so a bad value fails there, in one line, and not deep inside the model.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(low: int, optional: bool = False):
    return (lambda v: (optional and v is None) or (_is_int(v) and v >= low),
            f"an integer >= {low}" + (" or null" if optional else ""))


def _number(ok, allowed: str):
    return lambda v: _is_number(v) and ok(v), f"a number {allowed}"


_BOOLEAN = (lambda v: isinstance(v, bool), "true or false")
_TOKEN_ID = _integer(0, optional=True)
MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next")
DTYPES = ("float32", "bfloat16", "float16")
FIELD_RULES = {
    "model_type": (lambda v: v in MODEL_TYPES, f"one of {', '.join(MODEL_TYPES)}"),
    "vocab_size": _integer(1), "hidden_size": _integer(1), "intermediate_size": _integer(1),
    "num_hidden_layers": _integer(1), "num_attention_heads": _integer(1), "num_key_value_heads": _integer(1),
    "head_dim": _integer(1, optional=True),
    "hidden_act": (lambda v: v == "silu", "'silu' (the activation Qwen3 uses)"),
    "max_position_embeddings": _integer(1),
    "initializer_range": _number(lambda v: v >= 0, ">= 0"),
    "rms_norm_eps": _number(lambda v: v > 0, "> 0"),
    "tie_word_embeddings": _BOOLEAN,
    "rope_theta": _number(lambda v: v > 0, "> 0"),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "an object (e.g. {\"rope_type\": \"yarn\", "
                                                               "\"factor\": 4.0}) or null"),
    "dual_chunk_attention_config": (lambda v: v is None or isinstance(v, dict), "an object (e.g. {\"chunk_size\": "
                                    "8192, \"local_size\": 256}) or null"),
    "attention_bias": _BOOLEAN,
    "attention_dropout": _number(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "use_sliding_window": _BOOLEAN,
    "sliding_window": _integer(1, optional=True),
    "max_window_layers": _integer(0),
    "bos_token_id": _TOKEN_ID,
    "eos_token_id": (lambda v: _TOKEN_ID[0](v) or (isinstance(v, list) and v and all(map(_TOKEN_ID[0], v))),
                     "a token id (an integer >= 0), a list of them, or null"),
    "pad_token_id": _TOKEN_ID,
    "torch_dtype": (lambda v: v is None or (isinstance(v, str) and v.removeprefix("torch.") in DTYPES),
                    f"one of {', '.join(DTYPES)}, or null"),
    "num_experts": _integer(0),
    "num_experts_per_tok": _integer(1),
    "moe_intermediate_size": _integer(1),
    "norm_topk_prob": _BOOLEAN,
    "decoder_sparse_step": _integer(1),
    "mlp_only_layers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of layer indices"),
    "router_aux_loss_coef": _number(lambda v: v >= 0, ">= 0"),
    "output_router_logits": _BOOLEAN,
    "layer_types": (lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
                    "a list of layer kinds or null"),
    "full_attention_interval": _integer(1),
    "partial_rotary_factor": _number(lambda v: 0 < v <= 1, "in (0, 1]"),
    "linear_conv_kernel_dim": _integer(1), "linear_key_head_dim": _integer(1), "linear_value_head_dim": _integer(1),
    "linear_num_key_heads": _integer(1), "linear_num_value_heads": _integer(1),
    "shared_expert_intermediate_size": _integer(0),
    "num_nextn_predict_layers": _integer(0),
    "mtp_loss_weight": _number(lambda v: v >= 0, ">= 0"),
}


def check_fields(config: Qwen3Config) -> None:
    """Every field's type and range; the first bad one is a ValueError naming the field, its value and what is
    allowed."""
    for name, (ok, allowed) in FIELD_RULES.items():
        value = getattr(config, name)
        if not ok(value):
            raise ValueError(f"{name} = {json.dumps(value) if _jsonable(value) else repr(value)}: must be {allowed}")


def check_dual_chunk(config: Qwen3Config) -> None:
    """dual_chunk_attention_config: integer chunk_size > local_size >= 0, chunk_size within the trained length, an
    optional original_max_position_embeddings >= 1; other keys (the released configs' sparse-attention ones) are
    kept and ignored. A bad one is a ValueError naming the problem."""
    d = config.dual_chunk_attention_config
    chunk, local = d.get("chunk_size"), d.get("local_size", 0)
    original = d.get("original_max_position_embeddings")
    if not (_is_int(chunk) and chunk >= 2):
        raise ValueError(f"dual_chunk_attention_config chunk_size = {chunk!r}: must be an integer >= 2")
    if not (_is_int(local) and 0 <= local < chunk):
        raise ValueError(f"dual_chunk_attention_config local_size = {local!r}: must be an integer in "
                         f"0..chunk_size-1 ({chunk - 1}), so that chunks of chunk_size - local_size tokens remain")
    if original is not None and not (_is_int(original) and original >= 1):
        raise ValueError(f"dual_chunk_attention_config original_max_position_embeddings = {original!r}: must be an "
                         f"integer >= 1 or absent")
    if chunk > config.trained_length:
        raise ValueError(f"dual_chunk_attention_config chunk_size = {chunk} is larger than the trained length "
                         f"({config.trained_length}): no relative distance may exceed what the model was trained on")


def long_context(config: Qwen3Config, context: int | None = None, dual_chunk: int | None = None,
                 dual_chunk_local: int | None = None, yarn: float | None = None, trained: int | None = None) -> dict:
    """Config overrides (for load / load_model) that run a model past its trained length without training.

    dual_chunk=CHUNK: Dual Chunk Attention with chunks of CHUNK tokens (local_size CHUNK/32, Qwen's ratio, unless
    given; the logit scale starts past the trained length). yarn=FACTOR: YaRN rope scaling from the trained length.
    context: the longest sequence accepted (max_position_embeddings); default the trained length times the YaRN
    factor, or 4x with Dual Chunk Attention alone. trained: the length the weights saw (default: the config's
    trained_length; a small model's config may allow more than it was trained on)."""
    trained, overrides = trained or config.trained_length, {}
    if yarn is not None:
        overrides["rope_scaling"] = {"rope_type": "yarn", "factor": float(yarn),
                                     "original_max_position_embeddings": trained}
    if dual_chunk is not None:
        local = max(1, dual_chunk // 32) if dual_chunk_local is None else dual_chunk_local
        overrides["dual_chunk_attention_config"] = {"chunk_size": dual_chunk, "local_size": local,
                                                    "original_max_position_embeddings": trained}
    if context is None and overrides:
        context = int(trained * yarn) if yarn is not None else 4 * trained
    if context is not None:
        overrides["max_position_embeddings"] = max(context, config.max_position_embeddings)
    return overrides


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# Defaults transformers' Qwen3MoeConfig uses where a qwen3_moe config.json leaves a key out.
_MOE_DEFAULTS = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=None, num_experts=128, num_experts_per_tok=8,
                     moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1,
                     router_aux_loss_coef=0.001)

# ... and its Qwen3NextConfig where a qwen3_next config.json leaves a key out.
_NEXT_DEFAULTS = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=48, num_attention_heads=16,
                      num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                      moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True,
                      decoder_sparse_step=1, router_aux_loss_coef=0.001, partial_rotary_factor=0.25)

_NEXT_ONLY_FIELDS = ("layer_types", "full_attention_interval", "partial_rotary_factor", "linear_conv_kernel_dim",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
                     "shared_expert_intermediate_size", "num_nextn_predict_layers", "mtp_loss_weight")

_MOE_ONLY_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits")

# Released models: the config.json values (Qwen3 Technical Report tables 1-2 and the model cards).
_RELEASED_COMMON = dict(head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40960, vocab_size=151936,
                        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
_RELEASED = {
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8),
    "Qwen3-14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8),
    "Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8),
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True),
    "Qwen3-235B-A22B": dict(model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=1536, norm_topk_prob=True),
    "Qwen3-Next-80B-A3B": dict(model_type="qwen3_next", hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
                               num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=10_000_000.0,
                               partial_rotary_factor=0.25, max_position_embeddings=262144, num_experts=512,
                               num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               norm_topk_prob=True, full_attention_interval=4, linear_conv_kernel_dim=4,
                               linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                               linear_num_value_heads=32),
}


def padded_vocab_size(tokenizer_size: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: its size rounded up to a multiple of 64 (matmul-friendly; rows past the
    tokenizer are padding, never sampled)."""
    return -(-tokenizer_size // multiple) * multiple


def small_config(depth: int, vocab_size: int = 8192, moe: bool = False, max_position_embeddings: int = 4096,
                 hybrid: bool = False) -> Qwen3Config:
    """Laptop-sized Qwen3 shapes from one knob (as nanochat): width 64*depth, head_dim 64, GQA 2:1, SwiGLU 3x.

    The MoE variant keeps the active FFN size of the dense one: 8 experts, top-2, each 1.5x hidden, so the two can be
    compared at equal active parameters. The hybrid (Qwen3-Next) variant is that MoE with a shared expert of 1.5x
    hidden (experts then 0.75x), 3 Gated DeltaNet layers per gated attention layer (heads of 32, twice as many value
    heads as key heads), RoPE on a quarter of head_dim, and a one-layer multi-token-prediction head."""
    hidden = 64 * depth
    heads = max(2, hidden // 64)
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=depth,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64, rope_theta=10000.0,
               max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, torch_dtype="float32")
    if moe:
        cfg.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden * 3 // 2,
                   norm_topk_prob=True)
    if hybrid:
        cfg.update(model_type="qwen3_next", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden * 3 // 4,
                   shared_expert_intermediate_size=hidden * 3 // 2, norm_topk_prob=True, partial_rotary_factor=0.25,
                   linear_num_key_heads=max(1, hidden // 64), linear_num_value_heads=max(2, hidden // 32),
                   linear_key_head_dim=32, linear_value_head_dim=32, num_nextn_predict_layers=1)
    return Qwen3Config(**cfg)


SMALL_PRESETS = {f"nano-d{d}": dict(depth=d) for d in (2, 4, 6, 8, 12)} | \
                {f"nano-moe-d{d}": dict(depth=d, moe=True) for d in (2, 4, 6, 8, 12)} | \
                {f"nano-next-d{d}": dict(depth=d, hybrid=True) for d in (4, 8)}
PRESETS = sorted(_RELEASED) + sorted(SMALL_PRESETS)


def with_overrides(config: Qwen3Config, **overrides) -> Qwen3Config:
    """A copy of a config with some fields changed, checked as a config.json is."""
    unknown = sorted(set(overrides) - set(FIELD_RULES))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    return dataclasses.replace(config, **overrides) if overrides else config


def get_preset(name: str, **overrides) -> Qwen3Config:
    """A named preset (released model or small), with field overrides (e.g. vocab_size for a trained tokenizer)."""
    if name in _RELEASED:
        return with_overrides(Qwen3Config(**(_RELEASED_COMMON | _RELEASED[name])), **overrides)
    if name in SMALL_PRESETS:
        return with_overrides(small_config(**SMALL_PRESETS[name]), **overrides)
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
