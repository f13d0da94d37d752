"""`sflllm optimize` through typer's CliRunner: tables, --json, --plot, --save-realised, bad input."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from sflllm.cli import app

SMALL = """\
seed: 4
model: {preset: stories260k, seq_len: 64}
clients: {count: 3}
network: {ms_subchannels: 6, fs_subchannels: 4}
baselines: {random_draws: 3}
"""
SPEC_KEYS = {"method", "split_layer", "rank", "rounds", "total_delay_s", "round_delay_s", "iteration_delay_s",
             "assignment_ms", "assignment_fs", "power_ms_w", "power_fs_w", "breakdown", "baselines", "scenario",
             "profile", "solve_time_s"}


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def _run(*args):
    return CliRunner().invoke(app, ["optimize", *map(str, args)])


def test_tables_by_default(scenario):
    result = _run("--scenario", scenario)
    assert result.exit_code == 0, result.output
    for text in ("split layer l / rank r", "main server link", "federated server link", "random_subchannel",
                 "ratio to proposed"):
        assert text in result.output


@pytest.mark.parametrize("clients, ms", [(5, 20), (2, 64)])
def test_tables_fit_80_columns_without_cutting(tmp_path, clients, ms):
    import io

    from rich.console import Console

    from sflllm.allocation.optimize import optimise
    from sflllm.allocation.report import render
    from sflllm.allocation.scenario import realise, scenario_from_mapping

    outcome = optimise(realise(scenario_from_mapping(
        {"clients": {"count": clients}, "network": {"ms_subchannels": ms, "fs_subchannels": 10},
         "baselines": {"random_draws": 2}})))
    stream = io.StringIO()
    render(outcome, Console(file=stream, width=80, color_system=None))
    text = stream.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    table = text.split("main server link: allocation")[1].split("main server link: delays")[0]
    cells = " ".join(line.split("│")[3] for line in table.splitlines() if line.startswith("│"))
    listed = set()
    for a, b in re.findall(r"(\d+)(?:-(\d+))?", cells):  # every subchannel, alone or in a run a-b
        listed.update(range(int(a), int(b or a) + 1))
    assert listed == set(range(ms))


def test_subchannel_lists_shorten_runs():
    import numpy as np

    from sflllm.allocation.report import _subchannels

    owner = np.array([0, 0, 0, 1, 0, 1, 1])
    assert (_subchannels(owner, 0), _subchannels(owner, 1)) == ("0-2, 4", "3, 5-6")


def test_json_has_the_spec_keys(scenario):
    result = _run("--scenario", scenario, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert SPEC_KEYS <= set(data)
    assert set(data["baselines"]) == {"random_subchannel", "equal_power", "fixed_split", "fixed_rank", "random_all"}
    assert set(data["breakdown"]) == {"client_compute_s", "uplink_s", "server_compute_s", "downlink_s",
                                      "aggregation_s"}
    assert sum(data["breakdown"].values()) == pytest.approx(data["total_delay_s"], rel=1e-9)
    assert len(data["assignment_ms"]) == 6 and len(data["power_fs_w"]) == 4
    assert set(data["profile"]) == {f"{l},{r}" for l in range(1, 5) for r in (1, 2, 4, 8, 16)}
    assert set(data["profile"]["2,8"]) == {"F_c", "B_c", "S", "A", "Y", "G", "Lam"}
    assert len(data["scenario"]["network"]["gains_ms"]) == 3 and len(data["scenario"]["clients"]["flops"]) == 3
    assert all(data["total_delay_s"] <= value for value in data["baselines"].values())


@pytest.mark.parametrize("method", ["proposed", "exact", "random_subchannel", "equal_power", "fixed_split",
                                    "fixed_rank", "random_all"])
def test_json_breakdown_adds_up_to_total_for_every_method(scenario, method):
    """Spec §8 for every method; a random baseline's delays are means over its draws (first draw shown)."""
    result = _run("--scenario", scenario, "--json", "--method", method)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sum(data["breakdown"].values()) == pytest.approx(data["total_delay_s"], rel=1e-9)
    assert data["total_delay_s"] == data["baselines"].get(method, data["total_delay_s"])
    if method.startswith("random_"):
        assert data["draws"] == 3 and "draw_total_delay_s" in data
    else:
        assert data["total_delay_s"] == pytest.approx(
            data["rounds"] * data["round_delay_s"], rel=1e-12)
        assert "draws" not in data and "draw_total_delay_s" not in data


def test_method_option_and_bad_method(scenario):
    result = _run("--scenario", scenario, "--json", "--method", "equal_power")
    assert result.exit_code == 0 and json.loads(result.stdout)["method"] == "equal_power"
    bad = _run("--scenario", scenario, "--method", "magic")
    assert bad.exit_code == 2 and "--method: unknown method 'magic'" in bad.output


def test_save_realised_reproduces_the_result(scenario, tmp_path):
    saved = tmp_path / "realised.yaml"
    first = _run("--scenario", scenario, "--json", "--save-realised", saved)
    assert first.exit_code == 0, first.output
    again = _run("--scenario", saved, "--json")
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    for key in ("split_layer", "rank", "total_delay_s", "assignment_ms", "power_ms_w", "power_fs_w", "baselines",
                "scenario"):
        assert a[key] == b[key], key


def test_plot_writes_pngs(scenario, tmp_path):
    out = tmp_path / "figures"
    result = _run("--scenario", scenario, "--plot", out)
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["allocation.png", "delay_breakdown.png", "delay_vs_pairs_and_baselines.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text, message", [
    ("clients: {count: 0}\n", "clients.count: "),
    ("network: {p_th_ms_w: -2}\n", "network.p_th_ms_w: "),
    ("training: {ranks: [3]}\n", "training.rounds_per_rank: "),
])
def test_bad_scenario_exits_2_with_one_line_and_writes_nothing(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    saved, plots = tmp_path / "realised.yaml", tmp_path / "plots"
    result = _run("--scenario", path, "--save-realised", saved, "--plot", plots)
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"error: {message}") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not saved.exists() and not plots.exists()


def test_optimize_imports_no_torch_or_matplotlib(scenario, heavy_modules_imported):
    assert heavy_modules_imported(["optimize", "--scenario", str(scenario), "--json"]) == []


def test_exact_on_a_large_instance_exits_2(tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text("model: {preset: stories260k, seq_len: 64}\n")  # K = 5, M = 20: too many assignments
    result = _run("--scenario", path, "--method", "exact")
    assert result.exit_code == 2 and result.output.startswith("error: --method exact: network.ms_subchannels = 20")
    assert "--method proposed" in result.output and "solve_link" not in result.output
