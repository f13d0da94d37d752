"""Model profile: per-block linear shapes, LoRA targets, FLOPs, payloads and client memory (spec §2, §7).

Everything here is plain arithmetic on integers and (optionally) numpy arrays, so the (l, r) search
can evaluate every pair at once by passing arrays for ``split_layer`` and ``rank``. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sflllm.files import echo

# Family default LoRA targets (spec §2).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
}
# HF model_type -> family. mistral and qwen2 are Llama-shaped (spec §6).
MODEL_FAMILIES: dict[str, str] = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a transformer block; ``name`` is its qualified name inside the block."""

    name: str
    d_in: int
    d_out: int
    bias: bool


@dataclass(frozen=True)
class ModelProfile:
    """The architecture numbers the cost model needs (spec §2, §7).

    ``linears`` lists one block's linear layers (all L blocks are identical); ``lora_targets`` the
    names they are matched against, like peft does.
    """

    family: str                     # "gpt2" | "llama"
    num_layers: int                 # L
    hidden_size: int                # d
    vocab_size: int                 # V
    attention_width: int            # d_att = n_heads * head_dim
    linears: tuple[LinearLayer, ...]
    lora_targets: tuple[str, ...]
    embedding_params: int           # P_emb: token (+ learned position) embeddings
    block_params: int               # P_blk: weights, biases and norms of one block
    max_positions: int | None = None  # the longest sequence s the model takes (None: its config does not say)

    @property
    def target_linears(self) -> tuple[LinearLayer, ...]:
        """The block's linear layers that carry LoRA (the set T of spec §2)."""
        return tuple(layer for layer in self.linears if matches_targets(layer.name, self.lora_targets))

    @property
    def linear_flops_per_token(self) -> int:
        """lin_j = 2 * sum over all linear W of the block of d_in * d_out."""
        return 2 * sum(layer.d_in * layer.d_out for layer in self.linears)

    @property
    def lora_width(self) -> int:
        """sum over W in T of (d_in + d_out): the LoRA parameters per block and per unit rank."""
        return sum(layer.d_in + layer.d_out for layer in self.target_linears)


def matches_targets(name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """peft's rule for a list of target names: the qualified name equals a target or ends with '.target'."""
    return any(name == target or name.endswith("." + target) for target in targets)


def _with_targets(profile_fields: dict[str, Any], lora_targets: list[str] | tuple[str, ...] | None) -> ModelProfile:
    family = profile_fields["family"]
    targets = tuple(lora_targets) if lora_targets is not None else DEFAULT_LORA_TARGETS[family]
    if not targets:
        raise ValueError("model.lora_targets: must name at least one layer (or be null for the family default)")
    names = [layer.name for layer in profile_fields["linears"]]
    for target in targets:
        if not any(matches_targets(name, (target,)) for name in names):
            raise ValueError(
                f"model.lora_targets: {target!r} matches no linear layer of a {family} block "
                f"(layers: {', '.join(names)})"
            )
    return ModelProfile(lora_targets=targets, **profile_fields)


def _gpt2_fields(*, n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int,
                 n_inner: int | None) -> dict[str, Any]:
    d = n_embd
    d_ff = n_inner if n_inner is not None else 4 * d
    linears = (
        LinearLayer("attn.c_attn", d, 3 * d, True),
        LinearLayer("attn.c_proj", d, d, True),
        LinearLayer("mlp.c_fc", d, d_ff, True),
        LinearLayer("mlp.c_proj", d_ff, d, True),
    )
    norms = 2 * 2 * d  # ln_1 and ln_2: weight and bias each
    return dict(
        family="gpt2", num_layers=n_layer, hidden_size=d, vocab_size=vocab_size, attention_width=d,
        linears=linears,
        embedding_params=vocab_size * d + n_positions * d,
        block_params=_linear_params(linears) + norms,
        max_positions=n_positions,
    )


def _llama_fields(*, model_type: str, num_hidden_layers: int, hidden_size: int, num_attention_heads: int,
                  num_key_value_heads: int, head_dim: int, intermediate_size: int, vocab_size: int,
                  attention_bias: bool, mlp_bias: bool, max_position_embeddings: int | None) -> dict[str, Any]:
    d = hidden_size
    q_width = num_attention_heads * head_dim
    kv_width = num_key_value_heads * head_dim
    # Qwen2 hard-codes biases on q, k, v and none on o (transformers' Qwen2Attention).
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = False if model_type == "qwen2" else attention_bias
    linears = (
        LinearLayer("self_attn.q_proj", d, q_width, qkv_bias),
        LinearLayer("self_attn.k_proj", d, kv_width, qkv_bias),
        LinearLayer("self_attn.v_proj", d, kv_width, qkv_bias),
        LinearLayer("self_attn.o_proj", q_width, d, o_bias),
        LinearLayer("mlp.gate_proj", d, intermediate_size, mlp_bias),
        LinearLayer("mlp.up_proj", d, intermediate_size, mlp_bias),
        LinearLayer("mlp.down_proj", intermediate_size, d, mlp_bias),
    )
    norms = 2 * d  # input_layernorm and post_attention_layernorm (RMSNorm: weight only)
    return dict(
        family="llama", num_layers=num_hidden_layers, hidden_size=d, vocab_size=vocab_size,
        attention_width=q_width, linears=linears,
        # Token embeddings only (rotary positions have no parameters); an untied LM head is the MS's.
        embedding_params=vocab_size * d,
        block_params=_linear_params(linears) + norms,
        max_positions=max_position_embeddings,
    )


def _linear_params(linears: tuple[LinearLayer, ...]) -> int:
    return sum(layer.d_in * layer.d_out + (layer.d_out if layer.bias else 0) for layer in linears)


# Hard-coded architecture numbers (the published HF configs), so no file is read for a preset.
_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257,
                        n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, vocab_size=50257,
                       n_positions=1024),
    # llama2.c stories260K (shared/data/models/stories260K/hf/config.json).
    "stories260k": dict(model_type="llama", num_hidden_layers=5, hidden_size=64, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=8, intermediate_size=172, vocab_size=512,
                        max_position_embeddings=512, tie_word_embeddings=True),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset_profile(name: str, lora_targets: list[str] | tuple[str, ...] | None = None) -> ModelProfile:
    """The profile of a built-in preset (gpt2, gpt2-medium, gpt2-large, stories260k)."""
    if name not in _PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    return profile_from_config(_PRESETS[name], lora_targets, source=f"preset {name}")


def profile_from_hf_config(path: str | Path, lora_targets: list[str] | tuple[str, ...] | None = None) -> ModelProfile:
    """The profile of a Hugging Face ``config.json`` (model_type gpt2, llama, mistral or qwen2)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"model.hf_config: file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.hf_config: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model.hf_config: {path} is not a JSON object")
    return profile_from_config(config, lora_targets, source=str(path))


def profile_from_config(config: Mapping[str, Any], lora_targets: list[str] | tuple[str, ...] | None = None,
                        *, source: str = "config") -> ModelProfile:
    """The profile of a HF config given as a mapping (the contents of config.json)."""
    model_type = config.get("model_type")
    family = MODEL_FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise ValueError(
            f"model.hf_config: {source}: unsupported model_type {echo(model_type)} "
            f"(supported: {', '.join(MODEL_FAMILIES)})"
        )

    def get(key: str, default: Any = ...) -> Any:
        """``config[key]``: a positive integer (or ``default`` when absent or null)."""
        value = config.get(key, default)
        if value is ...:
            raise ValueError(f"model.hf_config: {source}: missing key {key!r} for model_type {model_type}")
        if value is not default and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"model.hf_config: {source}: {key} must be a positive integer, got {echo(value)}")
        return value

    if family == "gpt2":
        fields = _gpt2_fields(n_layer=get("n_layer"), n_embd=get("n_embd"), n_head=get("n_head"),
                              vocab_size=get("vocab_size"), n_positions=get("n_positions"),
                              n_inner=get("n_inner", None))
    else:
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        fields = _llama_fields(
            model_type=model_type, num_hidden_layers=get("num_hidden_layers"), hidden_size=hidden,
            num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads", None) or heads,
            head_dim=get("head_dim", None) or hidden // heads, intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"), attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            max_position_embeddings=get("max_position_embeddings", None),
        )
    return _with_targets(fields, lora_targets)


@dataclass(frozen=True)
class CostNumbers:
    """Spec §2 per-sample numbers for a split layer l and rank r (scalars, or arrays broadcast over pairs).

    F_c, B_c, S in FLOP; A, Y, G, Lam in bits.
    """

    F_c: Any
    B_c: Any
    S: Any
    A: Any
    Y: Any
    G: Any
    Lam: Any

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in vars(self).items()}


DTYPE_BITS: dict[str, int] = {"float32": 32, "bfloat16": 16, "float16": 16}
"""Bits per element of each training dtype (``TrainConfig.dtype``): what a cut tensor costs on the link."""


def activation_bits(dtype: str) -> int:
    """q_act of spec §2 for cut tensors of ``dtype`` (``float32`` 32, ``bfloat16``/``float16`` 16): the
    delay model's default where a scenario does not fix ``act_bits``.  ValueError for other names."""
    try:
        return DTYPE_BITS[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BITS)}, got {dtype!r}") from None


def cost_numbers(profile: ModelProfile, split_layer: Any, rank: Any, *, seq_len: int, act_bits: int = 32,
                 token_bits: int = 32, weight_bits: int = 32) -> CostNumbers:
    """Spec §2: F_c, B_c, S, A, Y, G, Lam for split layer l and rank r (per sample of ``seq_len`` tokens)."""
    s, d = seq_len, profile.hidden_size
    L = profile.num_layers
    lin = profile.linear_flops_per_token
    lora = 2 * rank * profile.lora_width
    rho = lin + 4 * s * profile.attention_width + lora          # forward FLOPs per token and block
    varpi = lin + 8 * s * profile.attention_width + 2 * lora    # backward FLOPs per token and block
    l = split_layer
    return CostNumbers(
        F_c=s * l * rho,
        B_c=s * l * varpi,
        S=s * ((L - l) * (rho + varpi) + 4 * d * profile.vocab_size),
        A=s * d * act_bits,
        Y=s * token_bits,
        G=s * d * act_bits,
        Lam=weight_bits * l * rank * profile.lora_width,
    )


def client_memory_bytes(profile: ModelProfile, split_layer: Any, rank: Any, *, batch_size: int,
                        seq_len: int) -> Any:
    """Spec §7: mem(l, r) = 4 (P_emb + l P_blk) + 16 Plora(l, r) + 4 b s d 16 l bytes."""
    l = split_layer
    lora_params = l * rank * profile.lora_width  # Plora = Lam / q_w
    return (4 * (profile.embedding_params + l * profile.block_params) + 16 * lora_params
            + 4 * batch_size * seq_len * profile.hidden_size * 16 * l)
