"""LoRA attachment, loading, the demo model and the LM loss (sflllm.model)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from sflllm.cost.profile import MODEL_FAMILIES
from sflllm.model import (
    FAMILIES,
    attach_lora,
    build_demo_model,
    default_lora_targets,
    lm_loss,
    lm_loss_groups,
    lm_loss_sum,
    load_pretrained,
    lora_parameters,
    split_model,
)

# ---------------------------------------------------------------- loss


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), seq_len=st.integers(2, 7), vocab=st.integers(2, 11), seed=st.integers(0, 2**16))
def test_lm_loss_sum_is_the_shifted_token_cross_entropy(batch: int, seq_len: int, vocab: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    labels[torch.rand(batch, seq_len, generator=generator) < 0.3] = -100
    expected_sum, expected_count = 0.0, 0
    for b in range(batch):  # position t predicts labels[t + 1]
        for t in range(seq_len - 1):
            if labels[b, t + 1] != -100:
                expected_sum -= torch.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]].item()
                expected_count += 1
    total, count = lm_loss_sum(logits, labels)
    assert int(count) == expected_count
    assert total.item() == pytest.approx(expected_sum, rel=1e-5, abs=1e-5)
    if expected_count:
        assert lm_loss(logits, labels).item() == pytest.approx(expected_sum / expected_count, rel=1e-5)


def test_lm_loss_equals_the_hugging_face_model_loss() -> None:
    model = build_demo_model(50, seed=3)
    input_ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens carry no loss
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(lm_loss(out.logits, labels), out.loss)


def test_lm_loss_rejects_bad_shapes_and_batches_without_targets() -> None:
    with pytest.raises(ValueError, match="labels"):
        lm_loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 1  # the first label is never a target
    with pytest.raises(ValueError, match="no target token"):
        lm_loss(torch.zeros(2, 5, 7), labels)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=7), seq_len=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_lm_loss_groups_is_the_loss_of_each_group(sizes: list[int], seq_len: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(sum(sizes), seq_len, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (sum(sizes), seq_len), generator=generator)
    labels[torch.rand(sum(sizes), seq_len, generator=generator) < 0.3] = -100
    labels[:, 1] = 0  # every group has a target token
    got = lm_loss_groups(logits, labels, sizes)
    want = torch.stack([lm_loss(part, lab) for part, lab in zip(logits.split(sizes), labels.split(sizes))])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    weights = torch.rand(len(sizes), generator=generator)  # the gradient of any mix of the group losses
    (grad_got,) = torch.autograd.grad((weights * got).sum(), logits)
    (grad_want,) = torch.autograd.grad((weights * want).sum(), logits)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-7, rtol=1e-6)


def test_lm_loss_groups_rejects_bad_sizes_and_groups_without_targets() -> None:
    labels = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="add up"):
        lm_loss_groups(torch.zeros(3, 5, 7), labels, [1, 1])
    labels[1:, 1:] = -100
    with pytest.raises(ValueError, match="group 1 have no target token"):
        lm_loss_groups(torch.zeros(3, 5, 7), labels, [1, 2])


# ---------------------------------------------------------------- LoRA


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize(("make", "targets"), [
    (lambda: build_demo_model(40, seed=0), ("c_attn",)),
    (tiny_llama, ("q_proj", "v_proj")),
])
def test_attach_lora_freezes_the_base_and_adapts_the_family_targets(make, targets) -> None:
    model = make()
    model_type = model.config.model_type
    assert tuple(default_lora_targets(model_type)) == targets
    peft_model = attach_lora(model, rank=3, alpha=6, dropout=0.0)
    adapted = {name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in lora_parameters(peft_model)}
    assert adapted == set(targets)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(peft_model))
    assert all(p.shape[0] == 3 for name, p in lora_parameters(peft_model).items() if "lora_A" in name)
    assert all(p.shape[1] == 3 for name, p in lora_parameters(peft_model).items() if "lora_B" in name)


def test_attach_lora_honours_custom_targets_and_is_deterministic_from_its_seed() -> None:
    def lora_a(seed: int) -> dict[str, torch.Tensor]:
        peft_model = attach_lora(build_demo_model(40, seed=0), 2, 4, 0.0, targets=["c_fc"], seed=seed)
        return {n: p.detach() for n, p in lora_parameters(peft_model).items() if "lora_A" in n}

    rng_before = torch.get_rng_state()
    first, again, other = lora_a(5), lora_a(5), lora_a(6)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first and all(name.split(".lora_A")[0].endswith("c_fc") for name in first)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_gpt2_conv1d_adapter_is_applied_with_the_right_orientation() -> None:
    """Merging B@A into GPT-2's (in, out) Conv1D weights must reproduce the unmerged LoRA forward."""
    model = attach_lora(build_demo_model(40, seed=0), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    input_ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
        merged = model.merge_and_unload()(input_ids=input_ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [0, -2, 1.5])
def test_attach_lora_rejects_a_non_positive_rank(rank) -> None:
    with pytest.raises(ValueError, match="rank"):
        attach_lora(build_demo_model(40, seed=0), rank=rank, alpha=8, dropout=0.0)


def test_attach_lora_rejects_targets_that_match_nothing_and_leaves_the_model_alone() -> None:
    model = build_demo_model(40, seed=0)
    with pytest.raises(ValueError, match="no_such_layer"):
        attach_lora(model, rank=2, alpha=4, dropout=0.0, targets=["no_such_layer"])
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="targets"):
        attach_lora(model, rank=2, alpha=4, dropout=0.0, targets=[])
    one = attach_lora(model, rank=2, alpha=4, dropout=0.0, targets="c_fc")  # a string is one module name
    assert lora_parameters(one) and all(".c_fc.lora_" in name for name in lora_parameters(one))


def test_the_engine_and_the_cost_model_support_the_same_families() -> None:
    assert set(FAMILIES) == set(MODEL_FAMILIES)


def test_unsupported_family_is_rejected_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match="bert.*gpt2.*llama"):
        default_lora_targets("bert")


# ---------------------------------------------------------------- demo model


def test_demo_model_is_deterministic_from_its_seed_and_leaves_the_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    first, again, other = (build_demo_model(30, seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.h.0.attn.c_attn.weight"], other["transformer.h.0.attn.c_attn.weight"])
    assert build_demo_model(30, seed=7).config.n_layer == 4


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_heads": 3}, "num_heads"),
    ({"num_layers": -1}, "num_layers"),
    ({"eos_token_id": 30}, "eos_token_id"),
    ({"dropout": 1.0}, "dropout"),
    ({"init_std": 0.0}, "init_std"),
])
def test_demo_model_rejects_bad_fields_by_name(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_demo_model(**{"vocab_size": 30, "seed": 0, **kwargs})


def test_lora_on_the_frozen_demo_model_learns_through_the_split() -> None:
    """Real learning: SFL-style steps (client -> cut -> server) on LoRA only cut the training loss."""
    split = split_model(attach_lora(build_demo_model(64, seed=0), rank=8, alpha=16, dropout=0.0), split_layer=2)
    generator = torch.Generator().manual_seed(0)
    start, step = torch.randint(0, 64, (4, 1), generator=generator), torch.randint(1, 3, (4, 1), generator=generator)
    input_ids = (start + step * torch.arange(16)) % 64  # arithmetic progressions mod 64
    mask = torch.ones_like(input_ids)
    optimizer = torch.optim.Adam(lora_parameters(split.full).values(), lr=3e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = lm_loss(split.server(split.client(input_ids, mask), mask), input_ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- loading


def test_load_pretrained_stories260k_is_a_real_language_model(stories260k_dir) -> None:
    model, tokenizer = load_pretrained(str(stories260k_dir))
    assert tokenizer.pad_token == tokenizer.eos_token and model.config.pad_token_id == tokenizer.eos_token_id
    assert not model.training and next(model.parameters()).dtype == torch.float32
    batch = tokenizer(["Once upon a time, there was a little girl named Lily. She liked to play outside."],
                      return_tensors="pt")
    with torch.no_grad():
        loss = lm_loss(model(**batch).logits, batch["input_ids"])
    assert loss.item() < 0.5 * torch.log(torch.tensor(float(model.config.vocab_size))).item()  # far below uniform


def test_load_pretrained_names_a_missing_local_model(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        load_pretrained(str(missing))


def test_load_pretrained_names_an_unknown_hub_model_when_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ValueError, match="sflllm-test-org/no-such-model"):
        load_pretrained("sflllm-test-org/no-such-model")


def test_load_pretrained_lists_the_supported_families_for_another_model_type(tmp_path) -> None:
    BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bert") as excinfo:
        load_pretrained(str(tmp_path))
    assert all(name in str(excinfo.value) for name in FAMILIES)
