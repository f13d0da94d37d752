"""sflllm.data: loading, normalisation, prompt masking, the demo tokenizer and client partitions."""

from __future__ import annotations

import re
import warnings
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sflllm.data import (
    E2E_SLOTS,
    Example,
    build_demo_tokenizer,
    build_prompt,
    format_mr,
    load_examples,
    normalize_whitespace,
    parse_mr,
    partition,
    synthetic_examples,
    tokenize,
)
from sflllm.data.e2e import _hub_rows_to_examples
from sflllm.model.loss import IGNORE_INDEX


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


# ------------------------------------------------------------------------------------ loading


def test_csv_and_formatted_jsonl_are_the_same_data(e2e_dir):
    """devset.csv and split_lora/valid_formatted.jsonl line up row for row (README): MR syntax
    conversion and both loaders must agree once whitespace is ignored."""
    csv_rows = load_examples(e2e_dir / "devset.csv")
    jsonl_rows = load_examples(str(e2e_dir / "split_lora" / "valid_formatted.jsonl"))
    assert len(csv_rows) == len(jsonl_rows) > 1000
    for a, b in zip(csv_rows, jsonl_rows):
        assert _squash(a.mr) == _squash(b.mr)
        assert _squash(a.ref) == _squash(b.ref)
    assert all(parse_mr(e.mr)["name"] for e in jsonl_rows)
    assert all(e.mr == normalize_whitespace(e.mr) and e.ref == normalize_whitespace(e.ref) for e in csv_rows)


def test_test_csv_with_quoted_header_loads(e2e_dir):
    rows = load_examples(e2e_dir / "testset_w_refs.csv")
    assert len({e.mr for e in rows}) < len(rows)  # several references per MR
    assert all(set(parse_mr(e.mr)) <= set(E2E_SLOTS) for e in rows)


def test_csv_without_references_names_file_and_column(e2e_dir):
    with pytest.raises(ValueError, match=r"testset\.csv.*'ref'"):
        load_examples(e2e_dir / "testset.csv")


def test_token_id_jsonl_needs_text(e2e_dir):
    with pytest.raises(ValueError, match=r"valid\.jsonl, line 1: .*must be text"):
        load_examples(e2e_dir / "split_lora" / "valid.jsonl")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "dev.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_examples(missing)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: not a file"):
        load_examples(tmp_path)
    other = tmp_path / "dev.txt"
    other.write_text("name[A]||A.\n")
    with pytest.raises(ValueError, match=r"dev\.txt: unsupported file type '\.txt'"):
        load_examples(other)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"context": "name : A"}\n', "'context' and 'completion'"),
        ("not json\n", "not valid JSON"),
        ('{"context": "name : A", "completion": "   "}\n', "empty ref"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "name : B", "completion": "B."}\n' + content)
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 2: .*{re.escape(message)}"):
        load_examples(path)


def test_whitespace_is_normalised_on_load(tmp_path):
    path = tmp_path / "ws.csv"
    path.write_text('mr,ref\n"  name[A  B],\t area[riverside] ","A  B is\nby the   river. "\n')
    (example,) = load_examples(path)
    assert example == Example(mr="name[A B], area[riverside]", ref="A B is by the river.")
    assert parse_mr(example.mr) == {"name": "A B", "area": "riverside"}


@given(st.text(alphabet=" \t\n\r ab.", max_size=40))
def test_normalize_whitespace_properties(text):
    out = normalize_whitespace(text)
    assert out == normalize_whitespace(out)
    assert out.split() == text.split()
    assert "  " not in out and out == out.strip()


def test_hub_rows_mapping_for_both_hub_schemas():
    e2e_nlg = datasets.Dataset.from_dict(
        {"meaning_representation": ["name[A], area[riverside]"], "human_reference": [" A is  by the river."]}
    )
    gem = datasets.Dataset.from_dict({"gem_id": ["x"], "meaning_representation": ["name[B]"], "target": ["B."]})
    assert _hub_rows_to_examples(e2e_nlg, "e2e_nlg") == [Example("name[A], area[riverside]", "A is by the river.")]
    assert _hub_rows_to_examples(gem, "GEM/e2e_nlg") == [Example("name[B]", "B.")]
    with pytest.raises(ValueError, match=r"'other'.*meaning_representation"):
        _hub_rows_to_examples(datasets.Dataset.from_dict({"mr": ["a"], "text": ["b"]}), "other")


def test_unreachable_hub_dataset_is_one_error_without_hub_log_lines(monkeypatch, caplog):
    import logging

    def offline(name, split):  # what datasets/huggingface_hub do offline: log each retry, then fail
        logging.getLogger("huggingface_hub.utils._http").warning("'no network' thrown while requesting HEAD")
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    level = logging.getLogger("huggingface_hub").level
    with pytest.raises(ValueError, match=r"'e2e_nlg:test'.*Couldn't reach 'e2e_nlg'"):
        load_examples("e2e_nlg:test")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert logging.getLogger("huggingface_hub").level == level  # restored


# ------------------------------------------------------------------------- synthetic generator


def test_synthetic_examples_are_deterministic_and_e2e_shaped():
    a, b = synthetic_examples(200, seed=7), synthetic_examples(200, seed=7)
    assert a == b and len(a) == 200
    assert a != synthetic_examples(200, seed=8)
    slot_counts = Counter()
    for example in a:
        slots = parse_mr(example.mr)
        assert format_mr(slots) == example.mr  # official syntax, E2E slot order
        assert "name" in slots and 3 <= len(slots) <= 8
        assert example.ref.startswith(slots["name"]) or f"called {slots['name']}" in example.ref
        slot_counts.update(slots)
    assert set(slot_counts) == set(E2E_SLOTS)
    mrs = Counter(e.mr for e in a)
    assert len(mrs) < len(a)  # several references per MR, like E2E


# ---------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k_dir):
    return AutoTokenizer.from_pretrained(stories260k_dir)


@pytest.fixture(scope="module")
def byte_bpe_tokenizer():
    """A GPT-2-style tokenizer (byte-level BPE, no BOS, no pad), trained offline on synthetic text."""
    texts = [t for e in synthetic_examples(300, seed=1) for t in (build_prompt(e.mr), e.ref)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def test_demo_tokenizer_is_deterministic_and_round_trips(demo_tokenizer):
    assert build_demo_tokenizer().get_vocab() == demo_tokenizer.get_vocab()
    assert [demo_tokenizer.pad_token_id, demo_tokenizer.bos_token_id, demo_tokenizer.eos_token_id] == [0, 1, 2]
    for example in synthetic_examples(300, seed=3):
        for text in (example.ref, build_prompt(example.mr)):
            ids = demo_tokenizer(text)["input_ids"]
            assert ids[0] == demo_tokenizer.bos_token_id
            assert demo_tokenizer.unk_token_id not in ids
            assert demo_tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("tokenizer_name", ["demo_tokenizer", "stories_tokenizer", "byte_bpe_tokenizer"])
def test_loss_only_on_reference_plus_eos(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    examples = synthetic_examples(12, seed=5)
    batch = tokenize(examples, tokenizer, seq_len=320)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (12, 320)
    for i, example in enumerate(examples):
        mask = batch.attention_mask[i].bool()
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert (batch.input_ids[i, length:] == pad).all()
        target = batch.labels[i] != IGNORE_INDEX
        first = int(target.nonzero()[0])
        assert target[first:length].all() and not target[length:].any() and not target[:first].any()
        assert torch.equal(batch.labels[i, first:length], batch.input_ids[i, first:length])
        assert int(batch.labels[i, length - 1]) == eos
        label_ids = batch.labels[i, first : length - 1].tolist()
        assert tokenizer.decode(label_ids).strip() == example.ref
        prompt_text = tokenizer.decode(batch.input_ids[i, :first].tolist(), skip_special_tokens=True)
        assert _squash(prompt_text) == _squash(build_prompt(example.mr))


def test_tokenize_normalises_whitespace(demo_tokenizer):
    clean = synthetic_examples(4, seed=2)
    messy = [Example(mr="  " + e.mr.replace(" ", "\t "), ref=e.ref.replace(" ", "\n  ") + " ") for e in clean]
    a, b = tokenize(clean, demo_tokenizer, 96), tokenize(messy, demo_tokenizer, 96)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.mrs == b.mrs and a.refs == b.refs


def test_long_references_are_truncated_with_a_warning(demo_tokenizer):
    examples = synthetic_examples(6, seed=4)
    full = tokenize(examples, demo_tokenizer, 200)
    prompt_len = [int((full.labels[i] == IGNORE_INDEX).logical_and(full.attention_mask[i].bool()).sum())
                  for i in range(len(examples))]
    seq_len = max(prompt_len) + 3
    with pytest.warns(UserWarning, match=rf"of 6 references were truncated to fit seq_len={seq_len}"):
        short = tokenize(examples, demo_tokenizer, seq_len)
    assert torch.equal(short.input_ids, full.input_ids[:, :seq_len])
    assert torch.equal(short.labels, full.labels[:, :seq_len])


def test_prompt_longer_than_seq_len_is_an_error(demo_tokenizer):
    examples = synthetic_examples(5, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"seq_len=8 leaves no room for the reference in 5 of 5"):
            tokenize(examples, demo_tokenizer, 8)


def test_select_keeps_rows_and_texts(demo_tokenizer):
    batch = tokenize(synthetic_examples(10, seed=0), demo_tokenizer, 96)
    part = batch.select(np.array([7, 2]))
    assert len(part) == 2 and part.seq_len == 96
    assert torch.equal(part.labels[0], batch.labels[7]) and part.refs == (batch.refs[7], batch.refs[2])


def test_real_csv_tokenises_with_the_pretrained_tokenizer(e2e_dir, stories_tokenizer):
    examples = load_examples(e2e_dir / "devset.csv")[:64]
    batch = tokenize(examples, stories_tokenizer, 256)
    assert (batch.input_ids[:, 0] == stories_tokenizer.bos_token_id).all()
    last = batch.attention_mask.sum(1) - 1
    assert (batch.labels[torch.arange(64), last] == stories_tokenizer.eos_token_id).all()


# ---------------------------------------------------------------------------------- partitions


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(10, 80),
    num_clients=st.integers(1, 8),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(0.01, 100.0),
    attribute=st.sampled_from(["eatType", "food"]),
    keep_mr_together=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_partition_invariants(n, num_clients, scheme, alpha, attribute, keep_mr_together, seed):
    examples = synthetic_examples(n, seed=seed)
    kwargs = dict(scheme=scheme, alpha=alpha, attribute=attribute, seed=seed, keep_mr_together=keep_mr_together)
    units = len({e.mr for e in examples}) if keep_mr_together else n
    if units < num_clients:
        with pytest.raises(ValueError, match=f"only {units}"):
            partition(examples, num_clients, **kwargs)
        return
    parts = partition(examples, num_clients, **kwargs)
    assert len(parts) == num_clients and all(len(p) >= 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))  # disjoint and covering
    again = partition(examples, num_clients, **kwargs)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    if keep_mr_together:
        owner = {}
        for client, rows in enumerate(parts):
            for i in rows:
                assert owner.setdefault(examples[i].mr, client) == client
    if scheme == "iid" and not keep_mr_together:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def _label_skew(examples, parts, attribute):
    """Mean total-variation distance between each client's attribute distribution and the global one."""
    labels = np.array([parse_mr(e.mr).get(attribute, "<missing>") for e in examples])
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([(labels[p] == c).mean() for c in classes]) - overall).sum()
                          for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    examples = synthetic_examples(600, seed=0)
    skew = {
        alpha: np.mean([_label_skew(examples, partition(examples, 6, scheme="dirichlet", alpha=alpha,
                                                        attribute="food", seed=s), "food") for s in range(8)])
        for alpha in (100.0, 1.0, 0.05)
    }
    iid = np.mean([_label_skew(examples, partition(examples, 6, seed=s), "food") for s in range(8)])
    assert iid < skew[1.0] < skew[0.05] and skew[100.0] < skew[1.0]


def test_partition_rejects_bad_arguments():
    examples = synthetic_examples(20, seed=0)
    with pytest.raises(ValueError, match="scheme"):
        partition(examples, 2, scheme="shards")
    with pytest.raises(ValueError, match="attribute"):
        partition(examples, 2, scheme="dirichlet", attribute="colour")
    with pytest.raises(ValueError, match="alpha"):
        partition(examples, 2, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="cannot give 21 clients .* only 20 examples"):
        partition(examples, 21)
    mrs = len({e.mr for e in examples})
    with pytest.raises(ValueError, match=f"only {mrs} distinct MRs"):
        partition(examples, mrs + 1, keep_mr_together=True)


def test_dirichlet_missing_attribute_is_its_own_class():
    examples = [Example(f"name[N{i}]" + (", food[Italian]" if i % 2 else ""), "x") for i in range(40)]
    parts = partition(examples, 2, scheme="dirichlet", alpha=0.01, attribute="food", seed=3)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(40))
    owner = np.empty(40, dtype=int)
    for client, rows in enumerate(parts):
        owner[rows] = client
    # with a tiny alpha each class (with food / without food) lands (almost) whole on one client
    for has_food in (True, False):
        rows = [i for i in range(40) if ("food" in parse_mr(examples[i].mr)) == has_food]
        assert max(Counter(owner[rows]).values()) >= 0.9 * len(rows)


def test_tokenizer_without_eos_is_rejected(byte_bpe_tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=byte_bpe_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="has no eos_token"):
        tokenize(synthetic_examples(2, seed=0), no_eos, 64)
