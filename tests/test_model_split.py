"""Split equivalence: server(client(x, m), m) == full(x, m) for every split_layer and every family."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sflllm.model import FAMILIES, attach_lora, load_pretrained, lm_loss, lora_parameters, split_model

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random-init 4-block model of the family (GQA for the Llama-likes; sliding windows that bite)."""
    torch.manual_seed(0)
    if model_type == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=4, n_head=4))
    if model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY))
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY, sliding_window=3))
    if model_type == "qwen2":  # blocks 3-4 use a sliding window, blocks 1-2 full attention
        return Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=2))
    raise AssertionError(model_type)


def with_random_lora(model: torch.nn.Module, rank: int = 4) -> torch.nn.Module:
    """LoRA on the family defaults with a non-zero B, so the adapters change the output; eval mode."""
    peft_model = attach_lora(model, rank=rank, alpha=2 * rank, dropout=0.1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora_parameters(peft_model).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return peft_model.eval()


def padded_batch(vocab_size: int, side: str, seq_len: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, vocab_size, (3, seq_len), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, length in ((1, 6), (2, 3)):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : seq_len - length] = 0
    return input_ids, mask


def assert_split_matches_full(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    num_layers = split_model(model, 1).num_layers
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
        for split_layer in range(1, num_layers):
            split = split_model(model, split_layer)
            hidden = split.client(input_ids, mask)
            assert hidden.shape == (*input_ids.shape, model.config.hidden_size)
            torch.testing.assert_close(split.server(hidden, mask), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_split_logits_equal_unsplit_for_every_split_layer(model_type: str, side: str) -> None:
    model = with_random_lora(tiny_model(model_type))
    input_ids, mask = padded_batch(VOCAB, side)
    with torch.no_grad():  # the adapters matter: disabling them changes the logits
        with model.disable_adapter():
            plain = model(input_ids=input_ids, attention_mask=mask).logits
        assert not torch.allclose(plain, model(input_ids=input_ids, attention_mask=mask).logits, atol=1e-3)
    assert_split_matches_full(model, input_ids, mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_matches_unsplit_on_pretrained_stories260k(stories260k_dir, side: str) -> None:
    model, tokenizer = load_pretrained(str(stories260k_dir))
    tokenizer.padding_side = side
    batch = tokenizer(["Once upon a time, there was a little girl named Lily.", "One day, a big dog"],
                      return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    assert_split_matches_full(with_random_lora(model), batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sfl_backward_through_the_cut_gives_the_full_model_gradients(model_type: str) -> None:
    """Client forward, server forward/backward on a detached cut, client backward with the cut gradient."""
    model = with_random_lora(tiny_model(model_type))
    input_ids, mask = padded_batch(VOCAB, "right")
    labels = input_ids.masked_fill(mask == 0, -100)
    split = split_model(model, 2)

    lm_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
    expected = {name: p.grad.clone() for name, p in lora_parameters(model).items()}
    model.zero_grad()

    hidden = split.client(input_ids, mask)
    cut = hidden.detach().requires_grad_()
    lm_loss(split.server(cut, mask), labels).backward()
    hidden.backward(cut.grad)
    got = {name: p.grad for name, p in lora_parameters(model).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    frozen = [p for name, p in model.named_parameters() if "lora_" not in name]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_parts_share_tensors_with_full_and_split_the_adapters(model_type: str) -> None:
    model = with_random_lora(tiny_model(model_type))
    split = split_model(model, 1)
    full_tensors = {id(p) for p in model.parameters()}
    for part in (split.client, split.server):
        assert {id(p) for p in part.parameters()} <= full_tensors  # views, no copies
    client, server = lora_parameters(split.client), lora_parameters(split.server)
    assert client and server
    assert {id(p) for p in client.values()}.isdisjoint(id(p) for p in server.values())
    assert {id(p) for p in client.values()} | {id(p) for p in server.values()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    blocks = len(split.client.blocks), len(split.server.blocks)
    assert blocks == (1, split.num_layers - 1)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_functional_call_with_per_client_lora_equals_loading_it(model_type: str) -> None:
    """What the SFL engine does: one frozen base, each client's LoRA tensors swapped in by name."""
    model = with_random_lora(tiny_model(model_type))
    split = split_model(model, 2)
    input_ids, mask = padded_batch(VOCAB, "right")
    shared = {name: p.detach().clone() for name, p in lora_parameters(split.client).items()}
    client_k = {name: (t + 0.3 * torch.randn_like(t)).requires_grad_() for name, t in shared.items()}

    hidden = functional_call(split.client, client_k, (input_ids, mask))
    hidden.pow(2).mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in client_k.values())
    for name, p in lora_parameters(split.client).items():  # the model's own adapter is untouched
        torch.testing.assert_close(p.detach(), shared[name], rtol=0, atol=0)
        assert p.grad is None

    with torch.no_grad():
        for name, p in lora_parameters(split.client).items():
            p.copy_(client_k[name])
        torch.testing.assert_close(split.client(input_ids, mask), hidden.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("split_layer", [0, -1, 4, 5, 1.5, True])
def test_split_layer_outside_1_to_L_minus_1_is_rejected(split_layer) -> None:
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"split_layer.*1\.\.3"):
        split_model(model, split_layer)
