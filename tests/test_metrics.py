"""sflllm.metrics: the E2E metrics equal the official scorer's; BLEU/NIST edge cases; the file format."""

from __future__ import annotations

import json
import math

import pytest

from sflllm.metrics import (
    METRICS,
    MeteorScorer,
    ScoreInputError,
    bleu,
    coco_tokenize,
    format_hypotheses,
    format_references,
    java_executable,
    mteval_tokenize,
    nist,
    nist_length_penalty,
    ptb_tokenize,
    ptb_tokenize_approx,
    read_e2e_files,
    score_e2e,
)
from sflllm.metrics.mteval import NIST_BETA

EXPECTED_KEYS = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr"}
SETS = ("loo", "template")
needs_java = pytest.mark.skipif(java_executable() is None, reason="java not found on PATH: METEOR 1.5 and the PTB jar need it")


@pytest.fixture(scope="module")
def scorer_check(e2e_dir):
    """Both scorer-check sets scored once, sharing one METEOR process (its start-up costs 10-30 s)."""
    folder = e2e_dir / "scorer-check"
    expected = json.loads((folder / "expected.json").read_text())
    data = {name: read_e2e_files(folder / f"{name}.hyp.txt", folder / f"{name}.ref.txt") for name in SETS}
    java = java_executable()
    if java is None:
        scores = {name: score_e2e(*data[name], meteor=False) for name in SETS}
    else:
        with MeteorScorer(java) as meteor:
            scores = {name: score_e2e(*data[name], meteor=meteor) for name in SETS}
    return expected, data, scores


@pytest.mark.slow  # the shared fixture starts METEOR once: 10-30 s
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("metric", [m for m in METRICS if m != "meteor"])
def test_metrics_equal_the_official_scorer(scorer_check, name, metric):
    expected, _, scores = scorer_check
    scale = 100 if metric in ("bleu", "rouge_l") else 1
    assert scores[name][metric] == pytest.approx(scale * expected[name][EXPECTED_KEYS[metric]], rel=5e-3)


@pytest.mark.slow
@needs_java
@pytest.mark.parametrize("name", SETS)
def test_meteor_equals_the_official_scorer(scorer_check, name):
    expected, _, scores = scorer_check
    assert scores[name]["meteor"] == pytest.approx(100 * expected[name]["METEOR"], rel=5e-3)
    assert scores[name]["tokenizer"] == "stanford-ptb (java)" and scores[name]["notes"] == []


@pytest.mark.slow
def test_without_java_meteor_is_omitted_and_the_rest_still_match(scorer_check, monkeypatch):
    """No java on PATH: METEOR is left out with a note; ROUGE-L and CIDEr on the Python PTB
    approximation still equal the official numbers."""
    expected, data, _ = scorer_check
    monkeypatch.setenv("PATH", "")
    for name in SETS:
        scores = score_e2e(*data[name])
        assert "meteor" not in scores and any("java not found" in n for n in scores["notes"])
        assert scores["tokenizer"] == "ptb approximation (python)"
        assert scores["rouge_l"] == pytest.approx(100 * expected[name]["ROUGE_L"], rel=5e-3)
        assert scores["cider"] == pytest.approx(expected[name]["CIDEr"], rel=5e-3)


@needs_java
def test_ptb_approximation_equals_the_jar_on_the_e2e_test_set(e2e_dir):
    import csv

    with open(e2e_dir / "testset_w_refs.csv", encoding="utf-8", newline="") as f:
        refs = sorted({row["ref"] for row in csv.DictReader(f)})
    (jar,) = ptb_tokenize([refs], java_executable())
    approx = [ptb_tokenize_approx(r) for r in refs]
    assert len(refs) > 4000
    assert [r for r, a, j in zip(refs, approx, jar) if a != j] == []


@needs_java
def test_ptb_tokenisation_details():
    sentences = ["The Vaults' prices are £20-25.", "It isn't (really) cheap...", "", "Café Rouge", "Mr. B. Smith, e.g."]
    (jar,) = ptb_tokenize([sentences], java_executable())
    assert jar == [
        "the vaults prices are # 20-25", "it is n't -lrb- really -rrb- cheap", "", "café rouge", "mr. b. smith e.g.",
    ]  # fmt: skip
    assert [ptb_tokenize_approx(s) for s in sentences] == jar
    hyps, refs = coco_tokenize(["A pub."], [["The pub.", "A bar!"]], java_executable())
    assert hyps == ["a pub"] and refs == [["the pub", "a bar"]]


# --------------------------------------------------------------------------- BLEU and NIST edge cases


def test_mteval_tokenisation_lowercases_and_keeps_unicode_words():
    assert mteval_tokenize("Café Rouge, near the £20-25 place.") == [
        "café", "rouge", ",", "near", "the", "£20", "-", "25", "place", ".",
    ]  # fmt: skip  (£ is not ASCII punctuation: it stays on its number, as in mteval-v13a)
    assert mteval_tokenize("3.5 stars, 1,000 seats") == ["3.5", "stars", ",", "1,000", "seats"]
    assert mteval_tokenize("") == [] and mteval_tokenize("   ") == []


def test_identical_hypothesis_and_reference():
    """BLEU 1; NIST with one reference of L distinct words: each unigram carries log2(L), every
    longer n-gram log2(1) = 0, so NIST = log2(L)."""
    sentence = "The Vaults is a cheap pub near Café Adriatic"
    assert bleu([sentence], [[sentence]]) == pytest.approx(1.0)
    assert nist([sentence], [[sentence]]) == pytest.approx(math.log2(9))


def test_one_reference_per_mr_is_a_valid_corpus():
    hyps = ["the cat sat on the mat", "a dog barked loudly today"]
    refs = [["the cat sat on the mat"], ["a dog barked loudly today"]]
    assert bleu(hyps, refs) == pytest.approx(1.0)
    # 11 reference words: "the" twice (info log2(11/2)), the other 9 words once (log2 11 each)
    expected_unigram = (2 * math.log2(11 / 2) + 9 * math.log2(11)) / 11
    # bigrams: info log2(count(w1) / count(w1 w2)); only "the cat"/"the mat" have count(w1) = 2 > 1
    expected_bigram = 2 * math.log2(2) / 9
    assert nist(hyps, refs) == pytest.approx(expected_unigram + expected_bigram)


def test_hypothesis_shorter_than_every_reference():
    """BLEU's brevity penalty uses the closest reference length (6); NIST's the average one (7)."""
    hyps, refs = ["a b c d"], [["a b c d e f", "a b c d e f g h"]]
    assert bleu(hyps, refs) == pytest.approx(math.exp(1 - 6 / 4))
    # unigram info: 14 reference words, a..d twice each -> log2(7); longer n-grams carry 0
    assert nist(hyps, refs) == pytest.approx(math.log2(7) * math.exp(-NIST_BETA * math.log(4 / 7) ** 2))
    assert nist_length_penalty(2, 3) == pytest.approx(0.5)  # mteval's beta: 0.5 at two thirds of the length
    assert nist_length_penalty(5, 4) == 1.0 and nist_length_penalty(0, 4) == 0.0


def test_empty_hypothesis():
    refs = [["the cat sat on the mat"], ["a dog barked loudly today"]]
    assert bleu([""], refs[:1]) == 0.0 and nist([""], refs[:1]) == 0.0
    # in a corpus, an empty hypothesis adds nothing but reference length (the shortest reference for BLEU)
    full, partial = bleu(["the cat sat on the mat", ""], refs), bleu(["the cat sat on the mat"], refs[:1])
    assert partial == pytest.approx(1.0)
    assert full == pytest.approx(math.exp(1 - (6 + 5) / 6))
    assert 0.0 < nist(["the cat sat on the mat", ""], refs) < nist(["the cat sat on the mat"], refs[:1])


def test_case_and_unicode():
    refs = [["Café Adriatic is a pub."]]
    assert bleu(["café adriatic is a pub."], refs) == pytest.approx(1.0)  # case-insensitive
    assert bleu(["CAFÉ ADRIATIC IS A PUB."], refs) == pytest.approx(1.0)
    cafe = bleu(["Cafe Adriatic is a pub."], refs)  # "cafe" is not "café": one unigram miss
    assert cafe < 1.0
    assert nist(["Café Adriatic is a pub."], refs) > nist(["Cafe Adriatic is a pub."], refs) > 0


def test_disjoint_hypotheses_score_near_zero():
    refs = [["the cat sat on the mat"]]
    assert bleu(["zebra quantum orbit velocity"], refs) < 1e-10
    assert nist(["zebra quantum orbit velocity"], refs) == 0.0


def test_more_matching_hypotheses_score_higher():
    refs = [["The Vaults is a pub near Café Adriatic."], ["Blue Spice is a coffee shop in the city centre."]]
    perfect = ["The Vaults is a pub near Café Adriatic.", "Blue Spice is a coffee shop in the city centre."]
    partial = ["The Vaults is a pub.", "Blue Spice is a shop in the centre."]
    for metric in (bleu, nist):
        assert metric(perfect, refs) > metric(partial, refs) > metric(["", ""], refs)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        nist(["a"], [[]])
    with pytest.raises(ScoreInputError, match="no hypotheses"):
        score_e2e([], [])
    with pytest.raises(ScoreInputError, match="MR 2 has an empty reference"):
        score_e2e(["a", "b"], [["a"], ["  "]], meteor=False)


# --------------------------------------------------------------------------- the plain-text format


def test_files_round_trip(tmp_path):
    hyps = ["The Vaults is a pub.", "", "Café  Rouge\nis near."]
    refs = [["The Vaults is a pub.", "A pub, The Vaults."], ["Blue Spice."], ["Café Rouge is near."]]
    (tmp_path / "h.txt").write_text(format_hypotheses(hyps), encoding="utf-8")
    (tmp_path / "r.txt").write_text(format_references(refs), encoding="utf-8")
    read_hyps, read_refs = read_e2e_files(tmp_path / "h.txt", tmp_path / "r.txt")
    assert read_hyps == ["The Vaults is a pub.", "", "Café Rouge is near."] and read_refs == refs


def test_reader_follows_the_official_scorer(tmp_path):
    """Lines are stripped and quoted string literals unquoted; a file without empty lines is single-reference."""
    (tmp_path / "h.txt").write_text('  "quoted, it\'s"  \nplain\n', encoding="utf-8")
    (tmp_path / "r.txt").write_text("first\nsecond\n", encoding="utf-8")
    assert read_e2e_files(tmp_path / "h.txt", tmp_path / "r.txt") == (["quoted, it's", "plain"], [["first"], ["second"]])


@pytest.mark.parametrize(
    ("hyp", "ref", "message"),
    [
        ("a\nb\n", "x\ny\n\nz\n\n", None),
        ("a\nb\nc\n", "x\ny\n\nz\n\n", "has 3 hypotheses but --ref .* has 2 reference blocks"),
        ("a\nb\n", "x\n\n\nz\n\n", r"reference block 2 \(line 3\) is empty"),
        ("a\n", "\nx\n\n", r"reference block 1 \(line 1\) is empty"),
        ("", "x\n\n", "no hypotheses"),
        ("a\n", "", "no references"),
    ],
)
def test_reader_errors(tmp_path, hyp, ref, message):
    (tmp_path / "h.txt").write_text(hyp, encoding="utf-8")
    (tmp_path / "r.txt").write_text(ref, encoding="utf-8")
    if message is None:
        assert read_e2e_files(tmp_path / "h.txt", tmp_path / "r.txt") == (["a", "b"], [["x", "y"], ["z"]])
    else:
        with pytest.raises(ScoreInputError, match=message):
            read_e2e_files(tmp_path / "h.txt", tmp_path / "r.txt")


def test_reader_rejects_binary_and_missing_files(tmp_path):
    (tmp_path / "r.txt").write_text("x\n\n", encoding="utf-8")
    (tmp_path / "nul.bin").write_bytes(b"abc\x00def\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ScoreInputError, match=r"--hyp .*nul.bin: binary file"):
        read_e2e_files(tmp_path / "nul.bin", tmp_path / "r.txt")
    with pytest.raises(ScoreInputError, match=r"--hyp .*latin1.txt: not UTF-8 text"):
        read_e2e_files(tmp_path / "latin1.txt", tmp_path / "r.txt")
    with pytest.raises(ScoreInputError, match=r"--ref .*missing.txt: no such file"):
        read_e2e_files(tmp_path / "r.txt", tmp_path / "missing.txt")
    with pytest.raises(ScoreInputError, match="is a directory"):
        read_e2e_files(tmp_path, tmp_path / "r.txt")
