"""sflllm.experiments.evaluation: reference grouping, generation and its scoring."""

from __future__ import annotations

import pytest
import torch

from sflllm.data import Example, build_demo_tokenizer, synthetic_examples, tokenize
from sflllm.experiments.evaluation import evaluate_generation, generate_texts, group_references
from sflllm.model import build_demo_model, lm_loss

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


def test_no_repeat_ngram_size_forbids_repeats(demo_tokenizer):
    """The untrained demo model loops on one token (">>>>"); no_repeat_ngram_size=2 forbids the bigram
    (">", ">") from occurring twice, so no run of three survives."""
    model = build_demo_model(len(demo_tokenizer), seed=0, num_layers=1, hidden_size=32, num_heads=2)
    mrs, _ = group_references(synthetic_examples(24, seed=1))
    free = generate_texts(model, demo_tokenizer, mrs[:2], max_new_tokens=24)
    capped = generate_texts(model, demo_tokenizer, mrs[:2], no_repeat_ngram_size=2, max_new_tokens=24)
    assert all(">>>>" in t for t in free)
    assert not any(">>>" in t for t in capped) and all(capped)


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
    metrics, mrs, hypotheses, references = evaluate_generation(
        model, demo_tokenizer, examples, max_new_tokens=40, batch_size=2, meteor=False
    )
    assert hypotheses == [e.ref for e in examples] and mrs == [e.mr for e in examples]
    assert references == [[e.ref] for e in examples]
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["rouge_l"] == pytest.approx(100.0)
    assert metrics["decoding"] == {
        "num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": 40, "do_sample": False,
    }  # fmt: skip
    beams = generate_texts(model, demo_tokenizer, mrs, num_beams=3, max_new_tokens=40)
    assert beams == hypotheses
    # LoRA's E2E decoding (beams, length penalty 0.8, no repeated 4-grams) also finds the memorised references
    lora = generate_texts(model, demo_tokenizer, mrs, num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=40)
    assert lora == hypotheses


def test_pretrained_llama_with_lora_batched_generation_equals_one_by_one(stories260k_dir):
    """Left padding must not change greedy outputs of the real (RoPE) model under a peft wrapper."""
    from sflllm.model import attach_lora, load_pretrained

    model, tokenizer = load_pretrained(str(stories260k_dir))
    model = attach_lora(model, rank=2, alpha=4, dropout=0.0)
    mrs = ["name[Cotto]", "name[Blue Spice], eatType[coffee shop], area[riverside]", "name[Zizzi], food[Italian]"]
    batched = generate_texts(model, tokenizer, mrs, max_new_tokens=6, batch_size=3)
    assert batched == [generate_texts(model, tokenizer, [mr], max_new_tokens=6)[0] for mr in mrs]
    assert all(isinstance(t, str) and t == " ".join(t.split()) for t in batched)
