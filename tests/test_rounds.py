"""Per-round allocations of a closed-loop run (allocation.rounds): T_round of every round is spec §4's
delay for the allocation recorded, with static and block fading; the seeded streams; no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sflllm.allocation.link import rates
from sflllm.allocation.optimize import build_problem, optimise
from sflllm.allocation.rounds import RANDOM_METHODS, block_fading_realised, round_allocations
from sflllm.allocation.scenario import realise, scenario_from_mapping
from sflllm.cost.delay import SystemTimes, evaluate_delay
from sflllm.cost.profile import CostNumbers, preset_profile

SCENARIO = {"seed": 3, "model": {"preset": "stories260k", "seq_len": 64},
            "training": {"batch_size": 4, "local_steps": 3, "ranks": [1, 2, 4], "rounds_per_rank": {1: 9, 2: 7, 4: 6}},
            "clients": {"count": 3}, "network": {"ms_subchannels": 8, "fs_subchannels": 5},
            "baselines": {"random_draws": 4}}


@pytest.fixture(scope="module")
def realised():
    return realise(scenario_from_mapping(SCENARIO))


@pytest.fixture(scope="module")
def pairs(realised):
    outcome = optimise(realised)
    subchannel, everything = outcome.optimiser.random_baselines()
    chosen = {"proposed": outcome.proposed, "fixed_split": outcome.optimiser.fixed_split(),
              "fixed_rank": outcome.optimiser.fixed_rank(), "equal_power": outcome.optimiser.equal_power(),
              "random_subchannel": subchannel, "random_all": everything}
    return {m: (s.split_layer, s.rank) for m, s in chosen.items()}


def _t_round_from_scratch(realised, l, r, record) -> float:
    """Spec §4 T_round recomputed from the recorded owners and powers, independently of allocation.rounds."""
    problem = build_problem(realised)
    i = problem.terms.pairs.index((l, r))
    numbers = CostNumbers(**{k: float(v[i]) for k, v in vars(problem.terms.numbers).items()})
    training = realised.scenario.training
    times = SystemTimes(batch_size=training.batch_size, local_steps=training.local_steps, rounds=1,
                        client_flops=realised.client_flops, server_flops=realised.scenario.server.flops)
    return evaluate_delay(numbers, times, rate_ms_bps=rates(problem.ms_link, record.ms.owner, record.ms.power_w),
                          rate_fs_bps=rates(problem.fs_link, record.fs.owner, record.fs.power_w),
                          downlink_rate_ms_bps=problem.downlink_rate_ms_bps,
                          downlink_rate_fs_bps=problem.downlink_rate_fs_bps).round_delay_s


@pytest.mark.parametrize("fading", ["static", "block"])
def test_each_round_time_is_t_round_of_the_allocation_used(realised, pairs, fading):
    rounds = round_allocations(realised, pairs, 4, fading)
    for method, records in rounds.items():
        assert [a.round for a in records] == [1, 2, 3, 4]
        for a in records:
            assert (a.split_layer, a.rank) == pairs[method]
            where = realised if fading == "static" else block_fading_realised(realised, a.round)
            expected = _t_round_from_scratch(where, a.split_layer, a.rank, a)
            assert a.delay.round_delay_s == pytest.approx(expected, rel=1e-9)
            assert a.delay.total_delay_s == a.delay.round_delay_s  # one round
            assert sum(a.delay.breakdown.values()) == pytest.approx(a.delay.round_delay_s, rel=1e-9)


def test_static_proposed_round_is_the_optimisers_and_constant(realised, pairs):
    rounds = round_allocations(realised, pairs, 3, "static")
    outcome = optimise(realised)
    for a in rounds["proposed"]:
        assert a.delay.round_delay_s == pytest.approx(outcome.proposed.round_delay_s, rel=1e-12)
        assert np.array_equal(a.ms.owner, outcome.proposed.ms.owner)


def test_block_fading_redraws_and_resolves_every_round_deterministically(realised, pairs):
    first = round_allocations(realised, pairs, 3, "block")
    again = round_allocations(realised, pairs, 3, "block")
    t = [a.delay.round_delay_s for a in first["proposed"]]
    assert len(set(t)) == 3  # the channel changed, and so did T_round
    assert t == [a.delay.round_delay_s for a in again["proposed"]]
    g1, g2 = block_fading_realised(realised, 1), block_fading_realised(realised, 2)
    assert not np.allclose(g1.gains_ms, g2.gains_ms, rtol=1e-3, atol=0)
    ratio = g1.gains_ms / realised.downlink_gain_ms[:, None]  # the large-scale gain stays, |h|^2 is redrawn
    assert np.all(ratio > 0) and 0.3 < ratio.mean() < 3


def test_random_baselines_draw_a_fresh_assignment_every_round(realised, pairs):
    rounds = round_allocations(realised, pairs, 4, "static")
    for method in RANDOM_METHODS:
        owners = {tuple(a.ms.owner) for a in rounds[method]}
        assert len(owners) > 1


def test_a_baseline_sharing_proposeds_pair_is_never_faster_under_static_channels(realised, pairs):
    rounds = round_allocations(realised, pairs, 5, "static")
    ours = np.cumsum([a.delay.round_delay_s for a in rounds["proposed"]])
    for method, records in rounds.items():
        if pairs[method] == pairs["proposed"]:
            theirs = np.cumsum([a.delay.round_delay_s for a in records])
            assert np.all(theirs >= ours * (1 - 1e-12)), method


def test_unknown_fading_is_an_error(realised, pairs):
    with pytest.raises(ValueError, match="fading"):
        round_allocations(realised, pairs, 1, "rician")


def test_rounds_module_imports_no_torch():
    code = "import sys, sflllm.allocation.rounds; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_profile_limits_seq_len_to_the_models_positions():
    assert preset_profile("stories260k").max_positions == 512
    with pytest.raises(ValueError, match=r"model.seq_len: 1024 exceeds the model's 512 positions"):
        realise(scenario_from_mapping({**SCENARIO, "model": {"preset": "stories260k", "seq_len": 1024}}))


def test_optimize_command_rejects_seq_len_beyond_the_positions(tmp_path):
    """As `sflllm train` does: a model with 128 positions cannot plan for s = 512 (spec §6 default)."""
    import json

    from typer.testing import CliRunner

    from sflllm.cli import app

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 300,
                                  "n_positions": 128}))
    scenario = tmp_path / "s.yaml"
    scenario.write_text("model: {hf_config: config.json}\n")
    result = CliRunner().invoke(app, ["optimize", "--scenario", str(scenario)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: model.seq_len: 512 exceeds the model's 128 positions"
    scenario.write_text("model: {hf_config: config.json, seq_len: 128}\n")
    assert CliRunner().invoke(app, ["optimize", "--scenario", str(scenario), "--json"]).exit_code == 0
