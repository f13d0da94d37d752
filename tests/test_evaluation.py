"""sflllm.experiments.evaluation: E2E metrics, reference grouping and generation."""

from __future__ import annotations

import pytest
import torch

from sflllm.data import Example, build_demo_tokenizer, synthetic_examples, tokenize
from sflllm.experiments.evaluation import evaluate_generation, generate_texts, group_references, text_metrics
from sflllm.model import build_demo_model, lm_loss

REFS = [
    ["The Vaults is a cheap pub near Café Adriatic.", "A cheap pub called The Vaults is near Café Adriatic."],
    ["Blue Spice is a coffee shop in the city centre."],
    ["Cotto serves Italian food. It is family-friendly.", "Cotto is a family-friendly Italian place.",
     "There is an Italian place called Cotto which welcomes children."],
]


def test_identical_hypotheses_score_perfectly():
    metrics = text_metrics([refs[-1] for refs in REFS], REFS)  # matches one of several references
    assert metrics["bleu"] == pytest.approx(100.0)
    assert metrics["rouge_l"] == pytest.approx(1.0)
    assert metrics["nist"] > 1.0
    assert metrics["num_hypotheses"] == 3
    for name in ("meteor", "cider"):  # present, or omitted with a reason
        assert name in metrics or any(note.startswith(f"{name} omitted") for note in metrics["notes"])


def test_disjoint_hypotheses_score_zero():
    metrics = text_metrics(["zebra quantum", "xylophone", "moon orbit velocity"], REFS)
    assert metrics["bleu"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["rouge_l"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["nist"] == pytest.approx(0.0, abs=1e-9)


def test_partial_overlap_is_between_and_ordered():
    perfect = text_metrics([refs[0] for refs in REFS], REFS)
    partial = text_metrics(["The Vaults is a pub.", "Blue Spice is a shop.", "Cotto serves food."], REFS)
    empty = text_metrics(["", "", ""], REFS)
    for name in ("bleu", "rouge_l", "nist"):
        assert empty[name] < partial[name] < perfect[name]
    assert empty["nist"] == 0.0


def test_cider_rewards_the_right_hypothesis():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (optional) is not installed")
    right = text_metrics([refs[0] for refs in REFS], REFS)["cider"]
    swapped = text_metrics([REFS[1][0], REFS[2][0], REFS[0][0]], REFS)["cider"]
    assert right > swapped >= 0.0


def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 3 reference lists"):
        text_metrics(["a", "b"], REFS)
    with pytest.raises(ValueError, match="at least one reference"):
        text_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="no hypotheses"):
        text_metrics([], [])


def test_group_references_one_entry_per_mr_in_order():
    examples = [Example("name[B]", "b1"), Example("name[A]", "a1"), Example("name[B]", "b2"), Example("name[A]", "a2")]
    mrs, refs = group_references(examples)
    assert mrs == ["name[B]", "name[A]"]
    assert refs == [["b1", "b2"], ["a1", "a2"]]
    synthetic = synthetic_examples(100, seed=0)
    mrs, refs = group_references(synthetic)
    assert len(set(mrs)) == len(mrs) and sum(map(len, refs)) == len(synthetic)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_demo_tokenizer()


def test_batched_generation_equals_one_by_one(demo_tokenizer):
    model = build_demo_model(len(demo_tokenizer), seed=0, num_layers=2, hidden_size=64, num_heads=2)
    model.train()
    mrs, _ = group_references(synthetic_examples(24, seed=1))
    mrs = mrs[:8]
    batched = generate_texts(model, demo_tokenizer, mrs, max_new_tokens=8, batch_size=4)
    single = [generate_texts(model, demo_tokenizer, [mr], max_new_tokens=8)[0] for mr in mrs]
    assert batched == single  # left padding + attention mask do not change greedy outputs
    assert len(batched) == len(mrs) and all(isinstance(t, str) for t in batched)
    assert model.training  # mode restored
    beams = generate_texts(model, demo_tokenizer, mrs[:3], num_beams=3, max_new_tokens=8)
    assert len(beams) == 3 and all(isinstance(t, str) for t in beams)


def test_generation_longer_than_the_model_is_an_error(demo_tokenizer):
    model = build_demo_model(len(demo_tokenizer), seed=0, num_layers=1, hidden_size=32, num_heads=2, max_positions=64)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate_texts(model, demo_tokenizer, [synthetic_examples(1, seed=0)[0].mr], max_new_tokens=64)


def test_generation_reproduces_memorised_references(demo_tokenizer):
    """Train the tiny demo model on two examples: greedy and beam decoding must then return exactly
    the references (prompt template, masking, EOS stop and new-token decoding all agree)."""
    pool = {e.mr: e for e in synthetic_examples(60, seed=0)}.values()
    examples = sorted(pool, key=lambda e: len(e.mr) + len(e.ref))[:2]
    batch = tokenize(examples, demo_tokenizer, seq_len=96)
    width = int(batch.attention_mask.sum(1).max())
    model = build_demo_model(len(demo_tokenizer), seed=0, num_layers=2, hidden_size=64, num_heads=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width]).logits
        loss = lm_loss(logits, batch.labels[:, :width])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics, mrs, hypotheses = evaluate_generation(model, demo_tokenizer, examples, max_new_tokens=40, batch_size=2)
    assert hypotheses == [e.ref for e in examples] and mrs == [e.mr for e in examples]
    assert metrics["bleu"] == pytest.approx(100.0)
    beams = generate_texts(model, demo_tokenizer, mrs, num_beams=3, max_new_tokens=40)
    assert beams == hypotheses


def test_pretrained_llama_with_lora_batched_generation_equals_one_by_one(stories260k_dir):
    """Left padding must not change greedy outputs of the real (RoPE) model under a peft wrapper."""
    from sflllm.model import attach_lora, load_pretrained

    model, tokenizer = load_pretrained(str(stories260k_dir))
    model = attach_lora(model, rank=2, alpha=4, dropout=0.0)
    mrs = ["name[Cotto]", "name[Blue Spice], eatType[coffee shop], area[riverside]", "name[Zizzi], food[Italian]"]
    batched = generate_texts(model, tokenizer, mrs, max_new_tokens=6, batch_size=3)
    assert batched == [generate_texts(model, tokenizer, [mr], max_new_tokens=6)[0] for mr in mrs]
    assert all(isinstance(t, str) and t == " ".join(t.split()) for t in batched)
