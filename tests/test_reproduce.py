"""``sflllm reproduce``: the delay study's files, its numbers against the optimiser run directly,
the reductions table against the CSVs, bad input, and (slow) the accuracy table on stories260K."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import heavy_modules_imported
from sflllm.allocation.optimize import BASELINES, optimise
from sflllm.allocation.scenario import Scenario, realise, scenario_from_mapping
from sflllm.cli import app
from sflllm.experiments import reproduce as rp
from sflllm.experiments.config import TrainInputError
from sflllm.experiments.reproduce_accuracy import AccuracySettings, resolve_sources

SMALL = rp.StudyConfig(
    seed=3, channel_draws=2, random_draws=3,
    values={"clients": (2, 6), "bandwidth": (5e5, 2e6), "client_power": (0.05, 0.2),
            "client_compute": (1e12, 5e12), "server_compute": (5e12, 2e13)},
)
METHODS = ("proposed", *BASELINES)
FILES = {"study.json", "base_scenario.yaml", "reductions.md",
         *(f"delay_vs_{axis}.{ext}" for axis in rp.AXES for ext in ("csv", "png")),
         *(f"split_rank_vs_{axis}.{ext}" for axis in rp.SPLIT_RANK_AXES for ext in ("csv", "png"))}


def _quiet() -> Console:
    return Console(quiet=True)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> rp.ReproduceRun:
    out = tmp_path_factory.mktemp("reproduce") / "study"
    return rp.run_reproduce(out, config=SMALL, console=_quiet(), progress=False)


def _direct(mapping: dict) -> object:
    """The optimiser on a scenario written the plain way (drawn from its seed), not through the study."""
    return optimise(realise(scenario_from_mapping({"seed": 3, "baselines": {"random_draws": 3}, **mapping})))


def test_study_writes_every_figure_as_png_and_csv(small_run):
    out = small_run.output
    assert {p.name for p in out.iterdir()} == FILES
    assert {p.name for p in small_run.files} == FILES
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    design = json.loads((out / "study.json").read_text())
    assert design["channel_seeds"] == [3, 4] and design["random_draws"] == 3
    assert design["axes"]["bandwidth"]["values"] == [5e5, 2e6]
    rows = _read_csv(out / "delay_vs_clients.csv")
    assert [(r["clients"], r["method"]) for r in rows] == [(k, m) for k in ("2", "6") for m in METHODS]


@pytest.mark.parametrize("axis, value, mapping", [
    ("bandwidth", 5e5, {"network": {"ms_subchannel_hz": 5e5, "fs_subchannel_hz": 5e5}}),
    ("client_power", 0.05, {"clients": {"p_max_w": 0.05}}),
    ("server_compute", 2e13, {"server": {"flops": 2e13}}),
    ("clients", 6, {"clients": {"count": 6}, "network": {"ms_subchannels": 64, "fs_subchannels": 64}}),
])
def test_csv_equals_the_optimiser_run_directly(small_run, axis, value, mapping):
    """The CSV's statistics are those of the optimiser on the plain scenario, over channel seeds 3 and 4.

    Sweeping a field on a fixed channel draw equals drawing with the field set (the draws do not
    depend on it); the clients sweep's largest K is the K_max realisation itself.
    """
    outcomes = [optimise(realise(scenario_from_mapping({"seed": seed, "baselines": {"random_draws": 3}, **mapping})))
                for seed in (3, 4)]
    column = rp.AXES[axis].column
    rows = {r["method"]: r for r in _read_csv(small_run.output / f"delay_vs_{axis}.csv")
            if float(r[column]) == value}
    for method in METHODS:
        samples = np.concatenate([o.solutions[method].draw_totals_s or [o.solutions[method].total_delay_s]
                                  for o in outcomes])
        row = rows[method]
        assert int(row["samples"]) == (6 if method.startswith("random") else 2)
        assert float(row["mean_total_delay_s"]) == pytest.approx(samples.mean(), rel=1e-12)
        assert float(row["std_total_delay_s"]) == pytest.approx(samples.std(), rel=1e-9, abs=1e-9)
        assert float(row["min_total_delay_s"]) == samples.min() and float(row["max_total_delay_s"]) == samples.max()
    # a random baseline's mean over its draws is the optimiser's reported baseline value
    mean_of_means = np.mean([o.baselines["random_all"] for o in outcomes])
    assert float(rows["random_all"]["mean_total_delay_s"]) == pytest.approx(mean_of_means, rel=1e-12)


def test_split_rank_csv_is_proposed_choice(small_run):
    rows = _read_csv(small_run.output / "split_rank_vs_bandwidth.csv")
    assert len(rows) == 4
    for row in rows:
        w = float(row["subchannel_hz"])
        outcome = optimise(realise(scenario_from_mapping({"seed": int(row["seed"]), "baselines": {"random_draws": 3},
                                                          "network": {"ms_subchannel_hz": w, "fs_subchannel_hz": w}})))
        assert (int(row["split_layer"]), int(row["rank"])) == (outcome.proposed.split_layer, outcome.proposed.rank)
        assert float(row["total_delay_s"]) == outcome.proposed.total_delay_s


def test_client_compute_sweep_scales_the_drawn_flops():
    explicit = rp.channel_base(Scenario(), SMALL, 0)
    point = rp.point_scenario(explicit, "client_compute", 1e12)
    drawn, scaled = np.array(explicit.clients.flops), np.array(point.clients.flops)
    assert scaled.mean() == pytest.approx(1e12, rel=1e-12)
    assert scaled / scaled.sum() == pytest.approx(drawn / drawn.sum(), rel=1e-12)
    assert point.network.gains_ms == explicit.network.gains_ms  # the channel stays


def test_clients_sweep_is_nested():
    """K clients of the sweep are the first K of the K_max realisation (same gains, distances, FLOP/s)."""
    explicit = rp.channel_base(Scenario(), SMALL, 0, clients=6)
    small, large = realise(rp.point_scenario(explicit, "clients", 2)), realise(explicit)
    assert np.array_equal(small.gains_ms, large.gains_ms[:2]) and np.array_equal(small.gains_fs, large.gains_fs[:2])
    assert np.array_equal(small.client_flops, large.client_flops[:2])
    assert np.array_equal(small.downlink_gain_ms, large.downlink_gain_ms[:2])


def test_proposed_is_never_worse_than_a_baseline(small_run):
    for axis in SMALL.values:
        rows = _read_csv(small_run.output / f"delay_vs_{axis}.csv")
        column = rp.AXES[axis].column
        for value in {r[column] for r in rows}:
            means = {r["method"]: float(r["mean_total_delay_s"]) for r in rows if r[column] == value}
            for name in BASELINES:
                assert means["proposed"] <= means[name] * (1 + 1e-12), (axis, value, name)
    for point in small_run.study.points:  # per channel draw, the deterministic baselines too
        for name in ("equal_power", "fixed_split", "fixed_rank"):
            assert point.samples["proposed"][0] <= point.samples[name][0] * (1 + 1e-12)


def test_reductions_table_agrees_with_the_csvs(small_run):
    text = (small_run.output / "reductions.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in BASELINES]
    table = {line.split(" | ")[0][2:]: [c.strip(" |") for c in line.split(" | ")[1:]] for line in lines}
    assert set(table) == set(BASELINES)
    largest_all = {}
    for i, axis in enumerate(SMALL.values):
        rows = _read_csv(small_run.output / f"delay_vs_{axis}.csv")
        column = rp.AXES[axis].column
        for name in BASELINES:
            reductions = []
            for value in dict.fromkeys(r[column] for r in rows):
                means = {r["method"]: float(r["mean_total_delay_s"]) for r in rows if r[column] == value}
                reductions.append(100 * (1 - means["proposed"] / means[name]))
            mean, largest = map(float, re.fullmatch(r"(-?[\d.]+)% \((-?[\d.]+)%\)", table[name][i]).groups())
            assert mean == pytest.approx(np.mean(reductions), abs=0.051)
            assert largest == pytest.approx(max(reductions), abs=0.051)
            largest_all[name] = max(largest_all.get(name, -math.inf), max(reductions))
    for name in BASELINES:
        assert float(table[name][-1].rstrip("%")) == pytest.approx(largest_all[name], abs=0.051)


def test_study_is_deterministic_from_its_seed(small_run):
    again = rp.run_study(Scenario(), SMALL)
    assert again.points == small_run.study.points
    other = rp.run_study(Scenario(), rp.StudyConfig(seed=4, channel_draws=1, random_draws=3,
                                                    values={"bandwidth": (5e5,)}))
    assert other.points[0].samples == next(p for p in small_run.study.on("bandwidth")
                                           if p.value == 5e5 and p.channel_draw == 1).samples


def test_a_failure_mid_study_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(realised, method="proposed"):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return optimise(realised, method)

    monkeypatch.setattr(rp, "optimise", failing)
    with pytest.raises(RuntimeError, match="boom"):
        rp.run_reproduce(tmp_path / "out", config=SMALL, console=_quiet(), progress=False)
    assert list(tmp_path.iterdir()) == []


def _cli(*args) -> object:
    return CliRunner().invoke(app, ["reproduce", *map(str, args)])


def test_cli_quick_run_and_summary(tmp_path):
    empty = tmp_path / "out"
    empty.mkdir()  # an empty existing folder is fine
    result = _cli("--output", empty, "--quick", "--random-draws", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert {p.name for p in empty.iterdir()} == FILES
    assert "proposed's delay reduction" in result.output and "random_all" in result.output
    design = json.loads((empty / "study.json").read_text())
    assert design["channel_draws"] == 1 and all(len(a["values"]) == 3 for a in design["axes"].values())


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--output", t / "full"], "error: --output: "),
    (lambda t: ["--output", t / "file.txt"], "error: --output: "),
    (lambda t: ["--output", t / "file.txt" / "sub"], "error: --output: cannot create"),
    (lambda t: ["--output", t / "new", "--channel-draws", 0], "error: --channel-draws: must be >= 1"),
    (lambda t: ["--output", t / "new", "--random-draws", 0], "error: --random-draws: must be >= 1"),
    (lambda t: ["--output", t / "new", "--scenario", t / "missing.yaml"], "error: --scenario "),
    (lambda t: ["--output", t / "new", "--scenario", t / "bad.yaml"], "error: --scenario "),
    (lambda t: ["--output", t / "new", "--model", "x"], "error: --model/--data/--eval-data apply only with --accuracy"),
    (lambda t: ["--output", t / "new", "--accuracy", "--model", "x"], "error: --accuracy: give --data too"),
    (lambda t: ["--output", t / "new", "--accuracy-rounds", 2], "error: --accuracy-rounds"),
    (lambda t: ["--output", t / "new", "--accuracy", "--model", "m", "--data", t / "missing.csv"],
     "error: --data: file not found"),
    (lambda t: ["--output", t / "new", "--accuracy", "--model", t / "no-model", "--data", t / "data.csv"],
     "error: --model: model "),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, make_args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "bad.yaml").write_text("clients: {count: 0}\n")
    (tmp_path / "data.csv").write_text("mr,ref\nname[A],A is a place.\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = _cli(*make_args(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_bad_scenario_field_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("clients: {count: 0}\n")
    result = _cli("--output", tmp_path / "new", "--scenario", tmp_path / "bad.yaml")
    assert "clients.count" in result.output


def test_reproduce_imports_no_torch(tmp_path):
    args = ("reproduce", "--output", str(tmp_path / "out"), "--quick", "--random-draws", "1", "--quiet")
    assert heavy_modules_imported(*args) == ["matplotlib"]  # the figures; no torch, transformers or peft


def test_accuracy_sources(tmp_path):
    with pytest.raises(TrainInputError, match="--accuracy needs --model and --data"):
        resolve_sources(None, None, None, shared=tmp_path)
    for path in ("models/stories260K/hf", "e2e/devset.csv", "e2e/testset_w_refs.csv"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    assert resolve_sources(None, None, None, shared=tmp_path) == (
        str(tmp_path / "models/stories260K/hf"), str(tmp_path / "e2e/devset.csv"),
        str(tmp_path / "e2e/testset_w_refs.csv"))
    assert resolve_sources("m", "d", None, shared=tmp_path) == ("m", "d", None)  # the user's choice wins
    with pytest.raises(TrainInputError, match="give --model too"):
        resolve_sources(None, "d", None, shared=tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*references were truncated:UserWarning")
def test_accuracy_table_on_stories260k(tmp_path, stories260k_dir, e2e_dir):
    settings = AccuracySettings(model=str(stories260k_dir), data=str(e2e_dir / "devset.csv"),
                                eval_data=str(e2e_dir / "testset_w_refs.csv"), rounds=2, local_steps=3,
                                eval_samples=48, generate_samples=4)
    tiny = rp.StudyConfig(channel_draws=1, random_draws=1, values={"bandwidth": (1e6,)})
    run = rp.run_reproduce(tmp_path / "out", config=tiny, accuracy=settings, console=_quiet(), progress=False)
    out = run.output
    assert [row["mode"] for row in run.accuracy] == ["sfl", "centralized", "fl", "sl"]
    table = (out / "accuracy.md").read_text()
    assert "l = 2, LoRA rank r = 8" in table and "2 rounds" in table  # stories260K: L = 5, middle block 2
    for row in run.accuracy:
        metrics = json.loads((out / "accuracy" / row["mode"] / "metrics.json").read_text())
        assert metrics["mode"] == row["mode"]
        assert row["heldout_loss"] == metrics["final"]["heldout_loss"]
        assert row["perplexity"] == pytest.approx(math.exp(row["heldout_loss"]))
        assert row["bleu"] == metrics["final"]["generation"]["bleu"]
        assert row["rouge_l"] == metrics["final"]["generation"]["rouge_l"]
        assert row["heldout_loss"] < row["initial_heldout_loss"] - 0.2  # every mode learns
        assert f"| {row['mode']} | {row['heldout_loss']:.4f} |" in table
    csv_rows = _read_csv(out / "accuracy.csv")
    assert [float(r["heldout_loss"]) for r in csv_rows] == [row["heldout_loss"] for row in run.accuracy]


def test_sigterm_mid_study_leaves_nothing(tmp_path):
    """The command turns SIGTERM into an unwind: its staging folder is removed and DIR never appears."""
    import signal
    import subprocess
    import sys
    import time

    code = "from sflllm.cli import app; app()"
    process = subprocess.Popen([sys.executable, "-c", code, "reproduce", "--output", str(tmp_path / "out"), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.*.partial")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert list(tmp_path.glob(".out.*.partial")), "the study never started"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(tmp_path.iterdir()) == []
