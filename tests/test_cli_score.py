"""`sflllm score`: the official scorer's plain-text files in, five metrics out; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sflllm.cli import app
from conftest import heavy_modules_imported
from sflllm.metrics import bleu, java_executable, nist

runner = CliRunner()
HYPS = "The Vaults is a cheap pub near Café Adriatic.\nBlue Spice is a coffee shop.\n"
REFS = (
    "The Vaults is a cheap pub near Café Adriatic.\nA cheap pub called The Vaults is near Café Adriatic.\n\n"
    "Blue Spice is a coffee shop in the city centre.\n\n"
)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "h.txt").write_text(HYPS, encoding="utf-8")
    (tmp_path / "r.txt").write_text(REFS, encoding="utf-8")
    return tmp_path / "h.txt", tmp_path / "r.txt"


def _score(*args: str):
    return runner.invoke(app, ["score", *args])


def test_json_output(files):
    hyp, ref = files
    result = _score("--hyp", str(hyp), "--ref", str(ref), "--json", "--no-meteor")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    hyps = HYPS.splitlines()
    refs = [["The Vaults is a cheap pub near Café Adriatic.", "A cheap pub called The Vaults is near Café Adriatic."],
            ["Blue Spice is a coffee shop in the city centre."]]
    assert scores["bleu"] == pytest.approx(100 * bleu(hyps, refs))  # x100, as the papers print it
    assert scores["nist"] == pytest.approx(nist(hyps, refs))
    assert 0 < scores["rouge_l"] <= 100 and scores["cider"] > 0
    assert "meteor" not in scores and scores["notes"] == ["meteor omitted on request"]
    assert scores["num_hypotheses"] == 2 and scores["num_references"] == 3


def test_table_output(files):
    hyp, ref = files
    result = _score("--hyp", str(hyp), "--ref", str(ref), "--no-meteor")
    assert result.exit_code == 0, result.output
    for header in ("BLEU x100", "NIST", "METEOR x100", "ROUGE-L x100", "CIDEr"):
        assert header in result.stdout
    assert "meteor omitted on request" in result.stdout


def _assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_file(files, tmp_path):
    hyp, _ = files
    _assert_clean_error(_score("--hyp", str(hyp), "--ref", str(tmp_path / "nope.txt")), "--ref", "nope.txt", "no such file")


def test_different_numbers_of_hypotheses_and_reference_blocks(files):
    hyp, ref = files
    hyp.write_text(HYPS + "A third one.\n", encoding="utf-8")
    _assert_clean_error(_score("--hyp", str(hyp), "--ref", str(ref)), "3 hypotheses", "2 reference blocks")


def test_empty_reference_block(files):
    hyp, ref = files
    ref.write_text(REFS.replace("\n\nBlue", "\n\n\nBlue"), encoding="utf-8")
    _assert_clean_error(_score("--hyp", str(hyp), "--ref", str(ref)), "r.txt", "reference block 2 (line 4) is empty")


def test_binary_file(files):
    hyp, ref = files
    hyp.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    _assert_clean_error(_score("--hyp", str(hyp), "--ref", str(ref)), "--hyp", "h.txt", "binary")


def test_score_imports_no_torch(files):
    """Scoring starts fast: neither torch nor transformers is imported."""
    hyp, ref = files
    assert heavy_modules_imported("score", "--hyp", str(hyp), "--ref", str(ref), "--json", "--no-meteor") == []


@pytest.mark.skipif(java_executable() is None, reason="java not found on PATH")
def test_a_failing_jar_is_one_line_exit_1(files, tmp_path, monkeypatch):
    import sflllm.metrics.coco as coco

    monkeypatch.setattr(coco, "PTB_JAR", tmp_path / "missing.jar")
    hyp, ref = files
    result = _score("--hyp", str(hyp), "--ref", str(ref), "--no-meteor")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Stanford PTBTokenizer"), lines
