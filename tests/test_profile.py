"""Model profile numbers (spec §2, §7) against hand-derived formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sflllm.cost.profile import (
    client_memory_bytes,
    cost_numbers,
    preset_profile,
    profile_from_config,
    profile_from_hf_config,
)

GPT2_DIMS = {"gpt2": (12, 768), "gpt2-medium": (24, 1024), "gpt2-large": (36, 1280)}


@pytest.mark.parametrize("name", sorted(GPT2_DIMS))
def test_gpt2_presets_match_hand_formulas(name):
    L, d = GPT2_DIMS[name]
    V, n_pos, s, l, r = 50257, 1024, 128, 3, 4
    p = preset_profile(name)
    assert (p.num_layers, p.hidden_size, p.vocab_size, p.attention_width) == (L, d, V, d)
    assert p.linear_flops_per_token == 2 * (3 * d * d + d * d + 8 * d * d)
    assert p.block_params == 12 * d * d + 13 * d
    assert p.embedding_params == V * d + n_pos * d
    assert p.lora_width == d + 3 * d  # default target c_attn: d -> 3d
    n = cost_numbers(p, l, r, seq_len=s)
    lin, lora = 24 * d * d, 2 * r * 4 * d
    rho, varpi = lin + 4 * s * d + lora, lin + 8 * s * d + 2 * lora
    assert n.F_c == s * l * rho and n.B_c == s * l * varpi
    assert n.S == s * ((L - l) * (rho + varpi) + 4 * d * V)
    assert (n.A, n.Y, n.G, n.Lam) == (s * d * 32, s * 32, s * d * 32, 32 * l * r * 4 * d)
    mem = client_memory_bytes(p, l, r, batch_size=2, seq_len=s)
    assert mem == 4 * (V * d + n_pos * d + l * (12 * d * d + 13 * d)) + 16 * l * r * 4 * d + 4 * 2 * s * d * 16 * l


def test_gpt2_c_proj_target_matches_both_layers_like_peft():
    d = 768
    p = preset_profile("gpt2", ["c_proj"])
    assert {t.name for t in p.target_linears} == {"attn.c_proj", "mlp.c_proj"}
    assert p.lora_width == (d + d) + (4 * d + d)
    assert preset_profile("gpt2", ["attn.c_proj"]).lora_width == 2 * d


def test_n_inner_sets_the_mlp_width():
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 100,
              "n_positions": 64, "n_inner": 48}
    p = profile_from_config(config)
    d, f = 32, 48
    assert p.linear_flops_per_token == 2 * (3 * d * d + d * d + 2 * d * f)
    assert p.block_params == (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d


def test_llama_gqa_shapes_biases_and_targets():
    config = {"model_type": "llama", "num_hidden_layers": 5, "hidden_size": 64, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 8, "intermediate_size": 172, "vocab_size": 512}
    p = profile_from_config(config)
    d, q, kv, f = 64, 64, 32, 172
    assert p.attention_width == 8 * 8
    assert p.linear_flops_per_token == 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)
    assert p.block_params == d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    assert p.embedding_params == 512 * d
    assert p.lora_width == (d + q) + (d + kv)  # q_proj, v_proj
    biased = profile_from_config({**config, "attention_bias": True, "mlp_bias": True})
    assert biased.block_params == p.block_params + (q + 2 * kv + d) + (2 * f + d)
    qwen = profile_from_config({**config, "model_type": "qwen2"})
    assert qwen.block_params == p.block_params + q + 2 * kv  # q, k, v biased; o not


def test_stories260k_preset_equals_its_config(stories260k_dir):
    assert preset_profile("stories260k") == profile_from_hf_config(stories260k_dir / "config.json")


def test_numbers_broadcast_over_pairs():
    p = preset_profile("gpt2")
    layers, ranks = np.array([1, 5, 11]), np.array([16, 2, 8])
    together = cost_numbers(p, layers, ranks, seq_len=64)
    for i in range(3):
        alone = cost_numbers(p, int(layers[i]), int(ranks[i]), seq_len=64)
        assert together.F_c[i] == alone.F_c and together.S[i] == alone.S and together.Lam[i] == alone.Lam


@pytest.mark.parametrize("config, field", [
    ({"model_type": "bert"}, "model_type"),
    ({"model_type": "gpt2", "n_layer": 2}, "n_embd"),
])
def test_bad_configs_are_named(config, field):
    with pytest.raises(ValueError, match=f"model.hf_config: .*{field}"):
        profile_from_config(config)


def test_bad_targets_and_presets_are_named(tmp_path):
    with pytest.raises(ValueError, match="model.lora_targets: 'q_proj' matches no linear layer"):
        preset_profile("gpt2", ["q_proj"])
    with pytest.raises(ValueError, match="model.preset: unknown preset 'gpt3'"):
        preset_profile("gpt3")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a JSON object"):
        profile_from_hf_config(bad)
