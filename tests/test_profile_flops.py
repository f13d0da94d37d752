"""Spec §2 forward FLOPs against torch's FLOP counter on real transformers modules with peft LoRA.

The only torch test of the optimiser side: the profile itself imports no torch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from sflllm.cost.profile import cost_numbers, profile_from_config  # noqa: E402

SEQ_LEN, RANK = 32, 4


def _measured_forward_flops(model, vocab_size: int) -> int:
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (1, SEQ_LEN))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids)
    return counter.get_total_flops()


def _expected_forward_flops(config: dict, targets: list[str]) -> int:
    """All L blocks (F_c at l = L) plus the LM head's 2 d V per token."""
    profile = profile_from_config(config, targets)
    numbers = cost_numbers(profile, profile.num_layers, RANK, seq_len=SEQ_LEN)
    return numbers.F_c + SEQ_LEN * 2 * profile.hidden_size * profile.vocab_size


def _with_lora(model, targets: list[str], fan_in_fan_out: bool):
    config = peft.LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                             fan_in_fan_out=fan_in_fan_out)
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_gpt2_forward_flops(targets):
    config = {"model_type": "gpt2", "n_layer": 3, "n_embd": 64, "n_head": 4, "vocab_size": 96,
              "n_positions": 64, "n_inner": 160}
    torch.manual_seed(0)
    hf = transformers.GPT2Config(**{k: v for k, v in config.items() if k != "model_type"},
                                 attn_implementation="eager")
    model = _with_lora(transformers.GPT2LMHeadModel(hf), targets, fan_in_fan_out=True)
    measured = _measured_forward_flops(model, config["vocab_size"])
    expected = _expected_forward_flops(config, targets)
    assert measured == pytest.approx(expected, rel=0.10)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"]])
def test_llama_gqa_forward_flops(targets):
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 128}
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"},
                                  attn_implementation="eager")
    model = _with_lora(transformers.LlamaForCausalLM(hf), targets, fan_in_fan_out=False)
    measured = _measured_forward_flops(model, config["vocab_size"])
    expected = _expected_forward_flops(config, targets)
    assert measured == pytest.approx(expected, rel=0.10)
