"""`sflllm calibrate`: E(r) per rank from held-out loss curves; the fragment loads into a scenario and
`sflllm run --calibration` uses it; a hand-written E(r) table gives the optimiser the same choice."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sflllm.allocation.optimize import optimise
from sflllm.allocation.scenario import load_scenario, realise, scenario_from_mapping
from sflllm.cli import app
from sflllm.experiments.run_options import CalibrateOptions, RunOptions
from sflllm.experiments.calibrate import default_target, rounds_table, run_calibrate
from sflllm.experiments.closed_loop import plan_run
from sflllm.experiments.config import TrainInputError, read_config_file

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(train_samples=48, eval_samples=16)




@pytest.fixture(scope="module")
def calibration(tmp_path_factory, tiny_scenario_file):
    out = tmp_path_factory.mktemp("cal") / "cal"
    options = CalibrateOptions(scenario=str(tiny_scenario_file), max_rounds=3, **TINY)
    return run_calibrate(options, out, progress=False, console=Console(quiet=True))


def test_rounds_table_and_default_target():
    curves = {1: [5.0, 4.5, 4.2], 2: [4.8, 4.0, 3.9], 4: [4.9, 4.1, 3.5]}
    assert rounds_table(curves, 4.1) == ({2: 2, 4: 2}, [1])
    assert rounds_table(curves, 3.0) == ({}, [1, 2, 4])
    assert default_target(5.5, [4.2, 3.9, 3.5], margin=0.1) == pytest.approx(3.5 + 0.1 * 2.0)


def test_calibration_writes_a_fragment_curves_and_a_figure(calibration, tiny_scenario_file):
    out, cal = calibration.output_dir, calibration.calibration
    for name in ("rounds_per_rank.yaml", "calibration.json", "curves.csv", "calibration.png"):
        assert (out / name).is_file(), name
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "rank,round,heldout_loss,train_loss" and len(rows) == 1 + 2 * 3
    curves: dict[int, list[float]] = {}
    for row in rows[1:]:
        rank, _, loss, _ = row.split(",")
        curves.setdefault(int(rank), []).append(float(loss))
    table, unreached = rounds_table(curves, cal["target_loss"])
    assert cal["rounds_per_rank"] == {str(r): e for r, e in table.items()} and cal["unreached_ranks"] == unreached
    assert table  # the default target (best final + 5% of the drop) is reached by the best rank at least
    assert cal["split_layer"] == 2  # the middle block of the 4-block demo model
    # the fragment is scenario keys: merged into the scenario, it loads and optimises
    fragment = read_config_file(out / "rounds_per_rank.yaml")
    assert fragment == {"training": {"ranks": sorted(table), "rounds_per_rank": table}}
    mapping = read_config_file(tiny_scenario_file)
    mapping["training"].update(fragment["training"])
    scenario = scenario_from_mapping(mapping)
    assert scenario.training.rounds_per_rank[sorted(table)[0]] == table[sorted(table)[0]]


def test_run_with_the_calibration_chooses_as_a_hand_written_table_does(calibration, tiny_scenario_file, tmp_path):
    plan = plan_run(RunOptions(scenario=str(tiny_scenario_file), calibration=(str(calibration.output_dir),), **TINY))
    table = {int(r): e for r, e in calibration.calibration["rounds_per_rank"].items()}
    assert plan.target_loss == calibration.calibration["target_loss"]
    assert any("calibration" in note for note in plan.overrides)
    # the same E(r) typed into the scenario by hand
    ranks = ", ".join(map(str, table))
    rounds = ", ".join(f"{r}: {e}" for r, e in table.items())
    by_hand = tmp_path / "by_hand.yaml"
    by_hand.write_text(tiny_scenario_file.read_text().replace("ranks: [2, 4], rounds_per_rank: {2: 3, 4: 2}",
                                                              f"ranks: [{ranks}], rounds_per_rank: {{{rounds}}}"))
    outcome = optimise(realise(load_scenario(by_hand), plan.realised.profile))
    assert (outcome.proposed.split_layer, outcome.proposed.rank) == plan.method_pairs["proposed"]
    assert outcome.proposed.total_delay_s == pytest.approx(plan.outcome.proposed.total_delay_s, rel=1e-12)


def test_calibration_with_other_training_settings_is_refused(calibration, tiny_scenario_file, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(tiny_scenario_file.read_text().replace("local_steps: 2", "local_steps: 3"))
    with pytest.raises(TrainInputError, match=r"calibration: .* measured with local_steps=2, this run has local_steps=3"):
        plan_run(RunOptions(scenario=str(other), calibration=(str(calibration.output_dir),), **TINY))


def test_split_layer_outside_the_model_fails_before_writing(tmp_path, tiny_scenario_file):
    out = tmp_path / "cal"
    result = CliRunner().invoke(app, ["calibrate", "--quiet", "--scenario", str(tiny_scenario_file), "--split-layer", "4",
                                      "--output", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: split_layer: 4 is outside 1..3 (the model has L = 4 blocks)"
    assert not out.exists()


def test_unreached_ranks_are_left_out_with_a_warning(calibration, tmp_path):
    """A target no rank reaches: every rank is reported and left out, none gets a made-up E."""
    out = tmp_path / "cal"
    (out / "runs").mkdir(parents=True)
    for run in (calibration.output_dir / "runs").iterdir():  # reuse the trained runs (train_pair resumes them)
        (out / "runs" / run.name).symlink_to(run, target_is_directory=True)
    options = CalibrateOptions(**{**read_config_file(calibration.output_dir / "calibrate.yaml"), "target_loss": 0.5})
    (out / "calibrate.yaml").write_text(json.dumps(options.model_dump()))
    from io import StringIO

    buffer = StringIO()
    result = run_calibrate(options, out, progress=False, console=Console(file=buffer, width=200), resume=True)
    assert result.calibration["rounds_per_rank"] == {} and result.calibration["unreached_ranks"] == [2, 4]
    assert buffer.getvalue().count("warning: rank") == 2
    assert read_config_file(out / "rounds_per_rank.yaml") == {"training": {"ranks": [], "rounds_per_rank": {}}}


def test_calibrations_at_two_precisions_let_the_search_choose_the_bits(calibration, tiny_scenario_file, tmp_path):
    """Beyond the paper: E(r) measured at 32 and at 8 bits (same target); the run picks the precision whose
    best plan is fastest and reports each precision's plan."""
    target = calibration.calibration["target_loss"]
    cal8 = run_calibrate(CalibrateOptions(scenario=str(tiny_scenario_file), max_rounds=3, act_bits=8, target_loss=target,
                                          **TINY), tmp_path / "cal8", progress=False, console=Console(quiet=True))
    if not cal8.calibration["rounds_per_rank"]:
        pytest.skip("no rank reached the 32-bit target at 8 bits in 3 rounds")
    folders = (str(calibration.output_dir), str(cal8.output_dir))
    plan = plan_run(RunOptions(scenario=str(tiny_scenario_file), calibration=folders, **TINY))
    search = plan.precision_search
    assert set(search) == {"32", "8"}
    best = min(search, key=lambda bits: search[bits]["planned_total_delay_s"])
    assert plan.act_bits == int(best) and plan.realised.scenario.model.act_bits == int(best)
    assert plan.outcome.proposed.total_delay_s == search[best]["planned_total_delay_s"]
    assert (plan.reference_key is not None) == (best != "32")  # below 32 bits the loss cost is measured
    with pytest.raises(TrainInputError, match="--act-bits: with several --calibration folders"):
        plan_run(RunOptions(scenario=str(tiny_scenario_file), calibration=folders, act_bits=8, **TINY))
    with pytest.raises(TrainInputError, match="measured at different act_bits"):
        plan_run(RunOptions(scenario=str(tiny_scenario_file), calibration=(folders[0], folders[0]), **TINY))
