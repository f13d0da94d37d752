"""`sflllm run`: optimise for the trained model, train every distinct (l, r) once, simulate each round's
allocation (static and block fading), report time to target; resume; bad input leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import sflllm.experiments.closed_loop as closed_loop
from sflllm.allocation.link import rates
from sflllm.allocation.optimize import build_problem
from sflllm.allocation.rounds import block_fading_realised
from sflllm.allocation.scenario import load_scenario, realise
from sflllm.cli import app
from sflllm.cost.delay import SystemTimes, evaluate_delay
from sflllm.cost.profile import CostNumbers
from sflllm.experiments.closed_loop import run_closed_loop
from sflllm.experiments.run_options import RunOptions

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(train_samples=48, eval_samples=16)
runner = CliRunner()




def _run(out: Path, scenario: Path, **options):
    return run_closed_loop(RunOptions(scenario=str(scenario), **TINY, **options), out, progress=False,
                           console=_quiet_console())


def _quiet_console():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def static_run(tmp_path_factory, tiny_scenario_file):
    return _run(tmp_path_factory.mktemp("run") / "static", tiny_scenario_file)


def _strict_json(path: Path):
    def bad(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=bad)


def _check_round_times(out: Path, metrics: dict) -> None:
    """Every round's T_round equals spec §4's delay for the recorded allocation, recomputed from the
    saved realised scenario (and, with block fading, that round's redrawn gains), to 1e-9 relative."""
    realised = realise(load_scenario(out / "scenario.yaml"))
    for method, record in metrics["methods"].items():
        total = 0.0
        for row in record["rounds"]:
            where = realised if metrics["fading"] == "static" else block_fading_realised(realised, row["round"])
            problem = build_problem(where)
            i = problem.terms.pairs.index((record["split_layer"], record["rank"]))
            numbers = CostNumbers(**{k: float(v[i]) for k, v in vars(problem.terms.numbers).items()})
            training = where.scenario.training
            times = SystemTimes(batch_size=training.batch_size, local_steps=training.local_steps, rounds=1,
                                client_flops=where.client_flops, server_flops=where.scenario.server.flops)
            expected = evaluate_delay(
                numbers, times,
                rate_ms_bps=rates(problem.ms_link, np.array(row["assignment_ms"]), np.array(row["power_ms_w"])),
                rate_fs_bps=rates(problem.fs_link, np.array(row["assignment_fs"]), np.array(row["power_fs_w"])),
                downlink_rate_ms_bps=problem.downlink_rate_ms_bps,
                downlink_rate_fs_bps=problem.downlink_rate_fs_bps).round_delay_s
            assert row["round_delay_s"] == pytest.approx(expected, rel=1e-9), (method, row["round"])
            total += row["round_delay_s"]
            assert row["sim_time_s"] == pytest.approx(total, rel=1e-12)


def test_static_run_writes_everything_and_each_round_time_is_t_round(static_run):
    out, metrics = static_run.output_dir, static_run.metrics
    for name in ("report.md", "metrics.json", "curves.csv", "loss_vs_time.png", "delay_breakdown.png",
                 "allocation.png", "scenario.yaml", "run.yaml", "model_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "round_delay.png").exists()  # only with block fading
    assert _strict_json(out / "metrics.json") == json.loads(json.dumps(metrics))
    _check_round_times(out, metrics)
    report = (out / "report.md").read_text()
    chosen = metrics["chosen"]
    assert f"split layer l = {chosen['split_layer']}, LoRA rank r = {chosen['rank']}" in report
    assert "Headline" in report and "random_all" in report
    rows = (out / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * metrics["rounds"]


def test_every_distinct_pair_is_trained_once_and_shared(static_run):
    metrics = static_run.metrics
    pairs = {(m["split_layer"], m["rank"]) for m in metrics["methods"].values()}
    assert len(list((static_run.output_dir / "pairs").iterdir())) == len(pairs) == len(metrics["pairs"])
    # rounds: the largest E(r) among the methods' ranks (E(2) = 3, E(4) = 2)
    ranks = {m["rank"] for m in metrics["methods"].values()}
    assert metrics["rounds"] == max({2: 3, 4: 2}[r] for r in ranks)
    by_pair: dict = {}
    for record in metrics["methods"].values():
        losses = [row["heldout_loss"] for row in record["rounds"]]
        by_pair.setdefault(record["pair"], losses)
        assert by_pair[record["pair"]] == losses  # methods with one (l, r) share one trace


def test_a_baseline_sharing_proposeds_pair_never_reaches_a_loss_before_proposed(static_run):
    methods = static_run.metrics["methods"]
    ours = methods["proposed"]
    for name, record in methods.items():
        if record["pair"] != ours["pair"]:
            continue
        for level in [row["heldout_loss"] for row in ours["rounds"]]:
            t_ours = next(r["sim_time_s"] for r in ours["rounds"] if r["heldout_loss"] <= level)
            t_theirs = next(r["sim_time_s"] for r in record["rounds"] if r["heldout_loss"] <= level)
            assert t_theirs >= t_ours * (1 - 1e-12), name


def test_headline_reductions_follow_time_to_target(static_run):
    metrics = static_run.metrics
    target = metrics["target_loss"]
    ours = metrics["methods"]["proposed"]["time_to_target_s"]
    for row in metrics["headline"]:
        record = metrics["methods"][row["method"]]
        first = next((r for r in record["rounds"] if r["heldout_loss"] <= target), None)
        assert row["time_to_target_s"] == (None if first is None else first["sim_time_s"])
        assert row["planned_rounds"] == {2: 3, 4: 2}[row["rank"]]  # E(r) of the scenario
        if row["method"] != "proposed" and row["time_to_target_s"]:
            assert row["reduction_by_proposed"] == pytest.approx(1 - ours / row["time_to_target_s"])


def test_block_fading_with_an_int8_cut(tmp_path, tiny_scenario_file):
    result = _run(tmp_path / "block", tiny_scenario_file, fading="block", act_bits=8)
    out, metrics = result.output_dir, result.metrics
    _check_round_times(out, metrics)
    assert (out / "round_delay.png").is_file()
    t = [row["round_delay_s"] for row in metrics["methods"]["proposed"]["rounds"]]
    assert len(set(t)) == len(t)  # re-solved for every round's channel
    assert metrics["act_bits"] == 8 and realise(load_scenario(out / "scenario.yaml")).scenario.model.act_bits == 8
    precision = metrics["precision"]
    assert precision["reference_bits"] == 32 and any(k.endswith("-q32") for k in metrics["pairs"])
    assert abs(precision["final_loss_cost"]) < 0.1
    report = (out / "report.md").read_text()
    assert "Cost of the cut precision (measured)" in report and "--act-bits 8 overrides" in report


def test_resume_finishes_an_interrupted_run_to_the_same_result(tmp_path, tiny_scenario_file, static_run, monkeypatch):
    calls = {"n": 0}
    original = closed_loop.train_pair

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(closed_loop, "train_pair", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(out, tiny_scenario_file)
    assert not (out / "report.md").exists()
    monkeypatch.setattr(closed_loop, "train_pair", original)
    resumed = run_closed_loop(RunOptions(), out, progress=False, console=_quiet_console(), resume=True)

    def without_wall(metrics):
        text = json.dumps(metrics)
        data = json.loads(text)
        for record in data["methods"].values():
            for row in record["rounds"]:
                row.pop("wall_time_s")
        for pair in data["pairs"].values():
            for row in pair["rounds"]:
                row.pop("wall_time_s")
        return data

    assert without_wall(resumed.metrics) == without_wall(static_run.metrics)


def _cli(*args):
    return runner.invoke(app, ["run", "--quiet", *map(str, args)])


def _assert_clean_error(result, out: Path, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("change, needle", [
    ("training: {batch_size: 4, local_steps: 2, ranks: [2], rounds_per_rank: {2: 2}, split_layers: [1, 7]}",
     "training.split_layers: [7] outside 1..3"),
    ("training: {batch_size: 4, local_steps: 2, ranks: [2, 512], rounds_per_rank: {2: 2, 512: 2}}",
     "training.ranks: rank(s) [512] exceed 128"),
    ("model: {seq_len: 512}", "model.seq_len: 512 exceeds the model's 128 positions"),
])
def test_bad_scenario_for_the_model_fails_before_training(tmp_path, tiny_scenario_file, change, needle):
    text = tiny_scenario_file.read_text()
    key = change.split(":")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key + ":")) + "\n" + change + "\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    _assert_clean_error(_cli("--scenario", path, "--train-samples", 48, "--output", out), out, needle)


def test_calibration_from_another_model_is_refused(tmp_path, tiny_scenario_file):
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "calibration.json").write_text(json.dumps(
        {"model": str(Path("../shared/data/models/stories260K/hf").resolve()), "architecture": "0" * 16,
         "rounds_per_rank": {"2": 3}, "target_loss": 3.0}))
    out = tmp_path / "out"
    result = _cli("--scenario", tiny_scenario_file, "--calibration", folder, "--output", out)
    _assert_clean_error(result, out, "was measured on model")


def test_bad_options_and_resume_misuse(tmp_path, tiny_scenario_file):
    out = tmp_path / "out"
    _assert_clean_error(_cli("--act-bits", 12, "--output", out), out, "act_bits")
    _assert_clean_error(_cli("--fading", "rician", "--output", out), out, "fading")
    _assert_clean_error(_cli("--resume", tmp_path / "nothing"), tmp_path / "nothing", "run.yaml not found")


def test_existing_output_is_not_overwritten(tmp_path, tiny_scenario_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = _cli("--scenario", tiny_scenario_file, "--output", out)
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_offline_default_run_prints_the_headline_and_the_report(tmp_path, monkeypatch):
    """`sflllm run` with no options: built-in model, synthetic data, demo scenario (README's first command)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["run", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "proposed's reduction" in result.stdout and "report: runs/" in result.stdout
    report = next(Path("runs").glob("*/report.md"))
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["target_loss"] == closed_loop.DEMO_TARGET_LOSS
    assert metrics["methods"]["proposed"]["time_to_target_s"] is not None
    shutil.rmtree("runs")


def test_q_act_follows_the_dtype_where_the_scenario_does_not_set_it(tiny_scenario_file, tmp_path):
    """spec §2's q_act: --act-bits, else the scenario's model.act_bits, else the bits of --dtype; the pairs
    train in that dtype on that device."""
    plan = closed_loop.plan_run(RunOptions(scenario=str(tiny_scenario_file), dtype="bfloat16", device="cpu", **TINY))
    assert plan.act_bits == 16 and any("follows --dtype bfloat16" in note for note in plan.overrides)
    assert {(c.dtype, c.device, c.act_bits) for c in plan.train_configs.values()} == {("bfloat16", "cpu", 16)}
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(tiny_scenario_file.read_text().replace("model: {seq_len: 104}", "model: {seq_len: 104, act_bits: 32}"))
    assert closed_loop.plan_run(RunOptions(scenario=str(fixed), dtype="bfloat16", **TINY)).act_bits == 32
    assert closed_loop.plan_run(RunOptions(scenario=str(fixed), dtype="bfloat16", act_bits=8, **TINY)).act_bits == 8
    assert closed_loop.plan_run(RunOptions(scenario=str(tiny_scenario_file), **TINY)).act_bits == 32


@pytest.mark.parametrize("command", ["run", "calibrate"])
def test_every_option_field_is_a_flag_and_bad_values_name_it(command, tmp_path):
    """run's and calibrate's flags are derived from their options models (declared once); a bad --dtype or
    --device is one line naming the field, and nothing is written."""
    from sflllm.experiments.run_options import CalibrateOptions

    fields = (RunOptions if command == "run" else CalibrateOptions).model_fields
    help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    for name in fields:
        assert "--" + name.replace("_", "-") in help_text, name
    out = tmp_path / "out"
    for flag, value, needle in (("--dtype", "float64", "dtype"), ("--device", "gpu", "device"),
                                ("--act-bits", "12", "act_bits")):
        result = runner.invoke(app, [command, "--quiet", flag, value, "--output", str(out)])
        _assert_clean_error(result, out, needle)
