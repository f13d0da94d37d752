"""Hostile and unlucky input: divergence, unwritable paths, resource bombs, and the last tracebacks.

Every case: exit status 2, one `error: ...` line naming the field or path, no traceback, no partial
output. Bomb and size cases run in a child process whose time and peak RSS are measured
(``os.wait4``'s rusage of that child alone) and bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sflllm.experiments.train as train_mod
from sflllm.allocation.scenario import ScenarioError, load_scenario
from sflllm.cli import app
from sflllm.experiments.config import TrainConfig
from sflllm.experiments.train import CONFIG_FILE, METRICS_FILE, STATE_FILE, run_train
from sflllm.files import MAX_YAML_BYTES
from sflllm.sfl import Federation

TINY = ["--clients", "2", "--local-steps", "2", "--batch-size", "4", "--train-samples", "24", "--eval-samples", "8"]
REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line that names every needle; returns it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _child_measured(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, float, float]:
    """Run ``sflllm ARGS`` in a fresh interpreter: (exit code, output, seconds, peak RSS in MB).

    The peak is the child's own VmHWM (read at exit): ``ru_maxrss`` would include the forked copy
    of this (torch-laden) test process.
    """
    peak_file = cwd / f".peak-{time.monotonic_ns()}"
    code = ("import atexit, sys; from pathlib import Path; "
            f"atexit.register(lambda: Path({str(peak_file)!r}).write_text("
            "[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])); "
            "from sflllm.cli import app; sys.argv[0] = 'sflllm'; app()")
    env = {**os.environ, "PYTHONPATH": REPO_SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"sflllm {' '.join(args)} ran over {timeout} s") from None
    seconds = time.perf_counter() - start
    peak_kb = int(peak_file.read_text())
    peak_file.unlink()
    return proc.returncode, output.decode("utf-8", "replace"), seconds, peak_kb / 1024


# ------------------------------------------------------------------------------------ 1. divergence


def test_divergence_stops_at_once_keeps_the_checkpoint_and_resumes_with_a_lower_lr(tmp_path):
    out = tmp_path / "run"
    assert _cli("train", *TINY, "--rounds", "1", "--output", out, "--quiet").exit_code == 0
    good = {name: (out / name).read_bytes() for name in (STATE_FILE, CONFIG_FILE)}

    result = _cli("train", "--resume", out, "--rounds", "3", "--lr", "1e10", "--quiet")
    line = _one_error_line(result, "diverged in round 2, iteration", "not finite", f"--resume {out} --lr 1e+09")
    metrics = _strict_json(out / METRICS_FILE)  # never NaN/Infinity: the good round and a flag
    assert [r["round"] for r in metrics["rounds"]] == [1] and metrics["final"] is None
    assert metrics["diverged"]["round"] == 2 and metrics["diverged"]["where"] in line
    assert (out / STATE_FILE).read_bytes() == good[STATE_FILE]  # the last good checkpoint is kept

    result = _cli("train", "--resume", out, "--rounds", "3", "--lr", "1e-3", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = _strict_json(out / METRICS_FILE)
    assert [(r["round"], r["lr"]) for r in metrics["rounds"]] == [(1, 0.01), (2, 1e-3), (3, 1e-3)]
    assert "diverged" not in metrics and metrics["final"]["heldout_loss"] < metrics["initial"]["heldout_loss"]


def test_overflowing_adamw_state_is_divergence_not_silent_success(tmp_path):
    # lora_alpha 1e30: AdamW's second moment overflows to inf and every update becomes exactly 0
    result = _cli("train", *TINY, "--rounds", "2", "--lora-alpha", "1e30", "--output", tmp_path / "run", "--quiet")
    _one_error_line(result, "round 1, iteration 1", "exp_avg_sq", "--lora-alpha")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {CONFIG_FILE, METRICS_FILE}
    _strict_json(tmp_path / "run" / METRICS_FILE)


def test_a_round_that_changes_nothing_is_warned_about(tmp_path):
    # lr 1e-50: every AdamW step underflows to 0 in float32, nothing is non-finite
    result = _cli("train", *TINY, "--rounds", "1", "--lr", "1e-50", "--output", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: round 1 left the adapters unchanged" in result.output


# ------------------------------------------------------------------------------------ 2. unwritable paths


def test_train_output_under_a_file_is_one_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_error_line(_cli("train", *TINY, "--output", tmp_path / "file" / "sub"), str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_optimize_plot_and_save_realised_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    scenario = tmp_path / "s.yaml"
    scenario.write_text("model: {preset: stories260k, seq_len: 64}\n")
    _one_error_line(_cli("optimize", "--scenario", scenario, "--plot", tmp_path / "file" / "sub"), "--plot",
                    str(tmp_path / "file" / "sub"))
    _one_error_line(_cli("optimize", "--scenario", scenario, "--save-realised", tmp_path / "file" / "r.yaml"),
                    "--save-realised", str(tmp_path / "file"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s.yaml"]


def test_a_failing_write_during_training_is_one_line(tmp_path, monkeypatch):
    real_replace = os.replace

    def read_only(src, dst):
        if str(dst).endswith(STATE_FILE):
            raise OSError(30, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr("sflllm.files.os.replace", read_only)
    result = _cli("train", *TINY, "--rounds", "1", "--output", tmp_path / "run", "--quiet")
    _one_error_line(result, f"cannot write {tmp_path / 'run' / STATE_FILE}", "Read-only file system")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_save_realised_is_0644_like_every_other_output(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("model: {preset: stories260k, seq_len: 64}\n")
    old = os.umask(0o022)
    try:
        assert _cli("optimize", "--scenario", scenario, "--save-realised", tmp_path / "r.yaml").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "r.yaml").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------ 3. sizes that cannot fit


def test_rank_above_the_smallest_lora_dimension_is_refused(tmp_path):
    # the demo model: hidden size 128, so c_attn (128 x 384) has 128 as its smallest dimension
    _one_error_line(_cli("train", *TINY, "--rank", "129", "--output", tmp_path / "run"), "rank: 129 exceeds 128")
    assert not (tmp_path / "run").exists()


def test_a_run_that_cannot_fit_in_memory_is_refused_fast_and_small(tmp_path):
    code, output, seconds, peak_mb = _child_measured(
        ["train", "--batch-size", "100000", "--output", str(tmp_path / "run")], tmp_path, timeout=120)
    assert code == 2 and "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "peak memory estimate" in line and "--batch-size" in line and "--force" in line
    assert not (tmp_path / "run").exists()
    assert seconds < 90 and peak_mb < 1500, (seconds, peak_mb)  # before: killed by the OOM killer at ~24 GB


def test_force_overrides_the_memory_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "available_memory", lambda: 1)
    _one_error_line(_cli("train", *TINY, "--rounds", "1", "--output", tmp_path / "a"), "peak memory estimate")
    result = _cli("train", *TINY, "--rounds", "1", "--output", tmp_path / "b", "--force", "--quiet")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------ 4. scenario limits


def _alias_bomb(levels: int) -> str:
    rows = ["&a0 [" + ", ".join(["1.0e-10"] * 10) + "]"]
    rows += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "network:\n  gains_ms:\n" + "".join(f"    - {row}\n" for row in rows)


@pytest.mark.parametrize("case", ["alias_bomb_8_levels", "alias_bomb_5_levels", "too_large", "binary", "long_value"])
def test_hostile_scenarios_are_refused_within_bounds(tmp_path, case):
    path = tmp_path / "scenario.yaml"
    if case.startswith("alias_bomb"):
        path.write_text(_alias_bomb(int(case.split("_")[2])))
        needles = ["alias", "line"]
    elif case == "too_large":
        with path.open("wb") as f:
            f.truncate(MAX_YAML_BYTES + 1)  # sparse: the size is refused before a byte is read
        needles = ["exceeds the limit", "MiB"]
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
        needles = ["not a UTF-8 text file"]
    else:
        path.write_text("clients: {flops: '" + "x" * 100_000 + "'}\n")
        needles = ["clients.flops", "(100002 characters)"]
    code, output, seconds, peak_mb = _child_measured(["optimize", "--scenario", str(path)], tmp_path)
    assert code == 2 and "Traceback" not in output, output[:2000]
    (line,) = output.splitlines()
    assert line.startswith("error: ") and all(n in line for n in needles), line
    assert len(line) < 600, len(line)  # a value is echoed up to ~200 characters
    assert seconds < 30 and peak_mb < 300, (seconds, peak_mb)  # before: 104 s / 19 GB (bomb), 216 s / 5.9 GB (size)


def test_config_file_aliases_are_refused_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: &r 4\nbatch_size: *r\n")
    _one_error_line(_cli("train", "--config", config, "--output", tmp_path / "run"), str(config), "alias")
    assert not (tmp_path / "run").exists()


def test_an_empty_scenario_is_warned_about(tmp_path):
    (tmp_path / "s.yaml").write_text("")
    result = _cli("optimize", "--scenario", tmp_path / "s.yaml", "--json")
    assert result.exit_code == 0
    assert "warning: scenario" in result.output and "is empty" in result.output


# ------------------------------------------------------------------------------------ 5. remaining tracebacks


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--lora-alpha", "--dirichlet-alpha"])
def test_non_finite_numbers_are_refused_where_declared(tmp_path, flag):
    field = flag[2:].replace("-", "_")
    _one_error_line(_cli("train", flag, "inf", "--output", tmp_path / "run"), field, "finite")
    assert not (tmp_path / "run").exists()


def test_garbage_hf_config_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": "abc", "n_embd": 64,
                                                      "n_head": 4, "vocab_size": 100, "n_positions": 64}))
    (tmp_path / "s.yaml").write_text("model: {hf_config: config.json}\n")
    _one_error_line(_cli("optimize", "--scenario", tmp_path / "s.yaml"), "model.hf_config", "n_layer",
                    "positive integer")


def test_exact_method_suggests_a_size_the_other_checks_accept(tmp_path):
    (tmp_path / "s.yaml").write_text("model: {preset: stories260k, seq_len: 64}\nclients: {count: 5}\n")
    line = _one_error_line(_cli("optimize", "--scenario", tmp_path / "s.yaml", "--method", "exact"), "--method exact")
    most = int(line.split("at most ")[1].split(" subchannels")[0])
    (tmp_path / "ok.yaml").write_text("model: {preset: stories260k, seq_len: 64}\nclients: {count: 5}\n"
                                      f"network: {{ms_subchannels: {most}, fs_subchannels: {most}}}\n")
    assert _cli("optimize", "--scenario", tmp_path / "ok.yaml", "--method", "exact", "--json").exit_code == 0


# ------------------------------------------------------------------------------------ 6. seq_len auto, --help


def test_seq_len_auto_fits_the_longest_training_example(tmp_path):
    from sflllm.data import build_demo_tokenizer, longest_example
    from sflllm.experiments.train import load_train_eval_examples

    config = TrainConfig(clients=2, local_steps=1, rounds=1, batch_size=4, train_samples=24, eval_samples=8)
    result = run_train(config, tmp_path / "run", progress=False)
    train, _ = load_train_eval_examples(config)
    assert result.metrics["seq_len"] == longest_example(train, build_demo_tokenizer()) < 128  # demo: 128 positions


@pytest.mark.slow
def test_the_natural_local_command_runs_with_the_default_seq_len(tmp_path, stories260k_dir, e2e_dir):
    result = _cli("train", "--model", stories260k_dir, "--data", e2e_dir / "devset.csv", "--train-samples", "60",
                  "--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--eval-samples", "4",
                  "--output", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = _strict_json(tmp_path / "run" / METRICS_FILE)
    assert 100 < metrics["seq_len"] <= 512 and f"seq_len={metrics['seq_len']} (auto" in result.output


def test_train_help_shows_every_default():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in TrainConfig.model_fields:
        assert "--" + name.replace("_", "-") in text, name
    assert text.count("[default:") >= len(TrainConfig.model_fields)
    assert "[default: (auto)]" in text and "[default: (16.0)]" in text


# ------------------------------------------------------------------------------------ 7-9. Ctrl-C, fast failure, small


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch):
    real_run_round = Federation.run_round

    def interrupted_in_round_2(self, round_index, progress=None):
        if round_index == 1:
            raise KeyboardInterrupt
        return real_run_round(self, round_index, progress)

    monkeypatch.setattr(Federation, "run_round", interrupted_in_round_2)
    result = _cli("train", *TINY, "--rounds", "3", "--output", tmp_path / "run", "--quiet")
    assert result.exit_code == 130
    assert f"interrupted after round 1; continue with: sflllm train --resume {tmp_path / 'run'}" in result.output


@pytest.mark.parametrize("args", [
    ["train", "--lr", "inf"], ["train", "--rank", "0"], ["train", "--output", "FILE/sub"],
    ["train", "--data", "missing.csv"], ["train", "--eval-data", "FILE.jsonl"],
    ["run", "--data", "missing.csv"], ["run", "--dtype", "float64"], ["calibrate", "--eval-data", "missing.jsonl"],
])
def test_option_and_path_errors_come_before_torch_loads(tmp_path, args):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FILE.jsonl").mkdir()
    code = ("import sys; from typer.testing import CliRunner; from sflllm.cli import app; "
            f"r = CliRunner().invoke(app, {args!r}); "
            "print(r.exit_code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": REPO_SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr


def test_version():
    from sflllm import __version__

    result = _cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"sflllm {__version__}"


def test_empty_csv_says_it_is_empty(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    line = _one_error_line(_cli("train", "--data", tmp_path / "empty.csv", "--output", tmp_path / "run"),
                           "empty.csv", "empty file")
    assert "None" not in line


def test_split_layer_error_does_not_repeat_the_field(tmp_path):
    line = _one_error_line(_cli("train", *TINY, "--split-layer", "99", "--output", tmp_path / "run"), "split_layer")
    assert "split_layer: split_layer" not in line


def test_scenario_loader_refuses_aliases_in_process(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("clients: {count: &k 3}\nseed: *k\n")
    with pytest.raises(ScenarioError, match=r"line 2, column 7: alias \*k refused"):
        load_scenario(path)


def test_long_values_are_echoed_cut_short(tmp_path):
    line = _one_error_line(_cli("train", "--model", "x" * 5000, "--output", tmp_path / "run"), "model")
    assert len(line) < 600, len(line)
    line = _one_error_line(_cli("train", "--seq-len", "2", "--output", tmp_path / "run"), "seq_len", "'auto'")


def test_the_demo_hint_runs_the_readme_examples():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    hint = train_mod.REAL_RUN_HINT
    for flag in ("--data", "--eval-data", "--model"):
        for value in hint.split(flag + " ")[1:]:
            assert f"{flag} {value.split()[0].rstrip('`')}" in readme, (flag, value.split()[0])
    assert "--seq-len" not in hint  # the default (auto) fits the data


def test_train_takes_an_integer_choice_from_the_command_line(tmp_path):
    """`--act-bits 8` is an int Literal field: the flag parses as an integer (the one error here is --rank's)."""
    from typer.testing import CliRunner

    from sflllm.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "--act-bits", "8", "--rank", "0", "--output", str(out)])
    assert result.exit_code == 2 and "rank" in result.stderr and "act_bits" not in result.stderr, result.stderr
    assert not out.exists()


def test_a_missing_or_directory_data_file_is_one_line(tmp_path):
    _one_error_line(_cli("train", "--data", tmp_path / "missing.csv", "--output", tmp_path / "run"),
                    "data: no such file", "missing.csv")
    (tmp_path / "dir.jsonl").mkdir()
    _one_error_line(_cli("run", "--eval-data", tmp_path / "dir.jsonl", "--output", tmp_path / "run"),
                    "eval_data: not a file", "dir.jsonl")
    assert not (tmp_path / "run").exists()
