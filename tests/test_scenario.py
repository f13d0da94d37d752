"""Scenario file (spec §6): defaults, validation messages, YAML 1.2, draws and the realised round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sflllm.allocation.scenario import (
    DEFAULT_ROUNDS_PER_RANK,
    Scenario,
    ScenarioError,
    load_scenario,
    realise,
    scenario_from_mapping,
)
from sflllm.network.channels import large_scale_gain


def _load(tmp_path, text: str, name: str = "scenario.yaml") -> Scenario:
    path = tmp_path / name
    path.write_text(text)
    return load_scenario(path)


def test_empty_file_gets_every_spec_default_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"scenario \S+ is empty: every field takes its default"):
        s = _load(tmp_path, "")
    assert s == Scenario()
    assert (s.seed, s.model.preset, s.model.seq_len, s.model.lora_targets) == (0, "gpt2", 512, None)
    assert (s.training.batch_size, s.training.local_steps, s.training.ranks) == (8, 20, [1, 2, 4, 8, 16])
    assert s.training.rounds_per_rank == DEFAULT_ROUNDS_PER_RANK
    assert s.clients.flops.uniform == (2.0e12, 8.0e12) and s.clients.p_max_w == 0.2
    assert (s.network.ms_subchannels, s.network.fs_subchannels, s.network.p_th_ms_w) == (20, 10, 0.8)
    assert (s.network.pathloss_db.intercept, s.network.pathloss_db.slope) == (128.1, 37.6)
    assert s.network.downlink.bandwidth_hz == 2.0e7 and s.baselines.random_draws == 20


def test_partial_mappings_merge_at_every_level(tmp_path):
    s = _load(tmp_path, "network:\n  downlink: {power_w: 3.5}\n  pathloss_db: {slope: 30}\n"
                        "training:\n  rounds_per_rank: {'8': 7}\n")
    assert s.network.downlink.power_w == 3.5 and s.network.downlink.enabled and s.network.downlink.bandwidth_hz == 2e7
    assert s.network.pathloss_db.slope == 30 and s.network.pathloss_db.intercept == 128.1
    assert s.network.ms_subchannels == 20
    assert s.training.rounds_per_rank == {**DEFAULT_ROUNDS_PER_RANK, 8: 7}


def test_yaml_12_numbers_and_string_keys(tmp_path):
    s = _load(tmp_path, "server: {flops: 2.0e12}\nclients: {flops: [1e12, 3.0e+12, 2e12, 1e12, 1e12]}\n"
                        "training: {ranks: [3], rounds_per_rank: {3: 10, '5': 4}}\n")
    assert s.server.flops == 2.0e12 and isinstance(s.server.flops, float)
    assert s.clients.flops == [1e12, 3e12, 2e12, 1e12, 1e12]
    assert s.training.rounds_per_rank[3] == 10 and s.training.rounds_per_rank[5] == 4


@pytest.mark.parametrize("text, field", [
    ("clients: {count: 0}", "clients.count"),
    ("clients: {cuont: 3}", "clients.cuont"),
    ("bogus: 1", "bogus"),
    ("clients: {flops: fast}", "clients.flops"),
    ("clients: {flops: {uniform: [3, 1]}}", "clients.flops"),
    ("clients: {flops: [1e12, 2e12]}", "clients.flops"),
    ("clients: {p_max_w: -0.1}", "clients.p_max_w"),
    ("network: {ms_subchannel_hz: 0}", "network.ms_subchannel_hz"),
    ("network: {p_th_fs_w: -1}", "network.p_th_fs_w"),
    ("network: {downlink: {power_w: 0}}", "network.downlink.power_w"),
    ("network: {fading: rician}", "network.fading"),
    ("network: {gains_ms: [[1.0]]}", "network.gains_ms"),
    ("clients: {count: 6}\nnetwork: {ms_subchannels: 5}", "network.ms_subchannels"),
    ("clients: {count: 11}\nnetwork: {ms_subchannels: 30}", "network.fs_subchannels"),
    ("training: {ranks: [32]}", "training.rounds_per_rank"),
    ("training: {split_layers: [0, 3]}", "training.split_layers"),
    ("training: {split_layers: [12]}", "training.split_layers"),
    ("training: {min_client_layers: 12}", "training.min_client_layers"),
    ("training: {batch_size: two}", "training.batch_size"),
    ("clients: {memory_bytes: 1000}", "clients.memory_bytes"),
    ("model: {preset: gpt5}", "model.preset"),
    ("model: {lora_targets: [q_proj]}", "model.lora_targets"),
    ("model: {hf_config: missing.json}", "model.hf_config"),
    ("baselines: {fixed_split: 12}", "baselines.fixed_split"),
    ("baselines: {fixed_rank: 3}", "baselines.fixed_rank"),
    ("seed: -1", "seed"),
    # wrong types are errors (spec §6): no bool -> int, float -> int, string -> number or int -> bool
    ("clients: {count: true}", "clients.count"),
    ("clients: {count: 5.0}", "clients.count"),
    ("model: {seq_len: true}", "model.seq_len"),
    ("seed: '3'", "seed"),
    ("training: {ranks: ['1', 2]}", "training.ranks.0"),
    ("network: {downlink: {enabled: 1}}", "network.downlink.enabled"),
    ("network: {downlink: {enabled: yes}}", "network.downlink.enabled"),
    ("server: {flops: true}", "server.flops"),
    ("server: {flops: '1e13'}", "server.flops"),
    ("training: {rounds_per_rank: {4: 7.0}}", "training.rounds_per_rank.4"),
    ("training: {rounds_per_rank: {'4': 7, 4: 9}}", "training.rounds_per_rank"),
    ("training: {rounds_per_rank: {4.0: 7}}", "training.rounds_per_rank"),
    ("[1, 2]", "scenario"),
])
def test_errors_name_the_field(tmp_path, text, field):
    with pytest.raises(ScenarioError) as info:
        realise(_load(tmp_path, text))
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_invalid_yaml_and_missing_file_are_named(tmp_path):
    with pytest.raises(ScenarioError, match=r"^scenario \S+scenario.yaml: invalid YAML at line 1"):
        _load(tmp_path, "clients: {count: 3")
    with pytest.raises(ScenarioError, match=r"^scenario \S+nope.yaml: file not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_memory_limit_removes_pairs_that_do_not_fit():
    from sflllm.cost.profile import client_memory_bytes, preset_profile

    profile = preset_profile("gpt2")
    limit = client_memory_bytes(profile, 4, 16, batch_size=8, seq_len=512)
    realised = realise(scenario_from_mapping({"clients": {"memory_bytes": [limit * 2, limit, limit * 3, limit, limit]}}))
    allowed = {(l, r) for l in range(1, 12) for r in (1, 2, 4, 8, 16)
               if client_memory_bytes(profile, l, r, batch_size=8, seq_len=512) <= limit}
    assert set(realised.pairs) == allowed and (4, 16) in allowed and (5, 1) not in allowed


def test_hf_config_is_relative_to_the_scenario_file(tmp_path):
    (tmp_path / "models").mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 50}
    (tmp_path / "models" / "config.json").write_text(json.dumps(config))
    realised = realise(_load(tmp_path, "model: {hf_config: models/config.json}\n"))
    assert realised.profile.num_layers == 4 and realised.split_layers == (1, 2, 3)
    with pytest.raises(ScenarioError, match="model.preset"):
        _load(tmp_path, "model: {hf_config: models/config.json, preset: gpt2}\n", name="both.yaml")


def test_draw_order_follows_the_spec():
    scenario = scenario_from_mapping({
        "seed": 7, "clients": {"count": 3, "flops": {"uniform": [1e12, 2e12]}, "p_max_w": [0.1, 0.2, 0.3],
                               "distance_ms_m": {"uniform": [10, 20]}, "distance_fs_m": [5.0, 6.0, 7.0],
                               "memory_bytes": {"uniform": [1e12, 2e12]}},
        "network": {"ms_subchannels": 4, "fs_subchannels": 3, "shadowing_db": 2.0}})
    realised = realise(scenario)
    rng = np.random.default_rng(7)
    flops = rng.uniform(1e12, 2e12, 3)
    dist_ms = rng.uniform(10, 20, 3)
    memory = rng.uniform(1e12, 2e12, 3)
    shadow_ms, shadow_fs = rng.normal(0, 2.0, 3), rng.normal(0, 2.0, 3)
    fading_ms, fading_fs = rng.exponential(1.0, (3, 4)), rng.exponential(1.0, (3, 3))
    np.testing.assert_array_equal(realised.client_flops, flops)
    np.testing.assert_array_equal(realised.distance_ms_m, dist_ms)
    np.testing.assert_array_equal(realised.memory_bytes, memory)
    np.testing.assert_array_equal(realised.shadowing_fs_db, shadow_fs)
    gbar_ms = large_scale_gain(dist_ms, shadow_ms, 128.1, 37.6)
    np.testing.assert_allclose(realised.gains_ms, gbar_ms[:, None] * fading_ms, rtol=1e-15)
    np.testing.assert_allclose(realised.gains_fs,
                               large_scale_gain([5.0, 6.0, 7.0], shadow_fs, 128.1, 37.6)[:, None] * fading_fs,
                               rtol=1e-15)
    np.testing.assert_array_equal(realised.downlink_gain_ms, gbar_ms)


def test_explicit_gains_replace_only_the_uplink_gains():
    gains = [[1e-9, 2e-9], [3e-9, 4e-9]]
    base = {"clients": {"count": 2, "distance_ms_m": [100.0, 200.0]},
            "network": {"ms_subchannels": 2, "fs_subchannels": 2}}
    realised = realise(scenario_from_mapping({**base, "network": {**base["network"], "gains_ms": gains}}))
    np.testing.assert_array_equal(realised.gains_ms, gains)
    np.testing.assert_allclose(realised.downlink_gain_ms, large_scale_gain([100.0, 200.0], [0, 0], 128.1, 37.6))


def test_realised_scenario_round_trips_exactly(tmp_path):
    scenario = _load(tmp_path, "seed: 3\nclients: {count: 4, memory_bytes: {uniform: [1e11, 2e11]}}\n"
                               "network: {shadowing_db: 6, fs_subchannels: 5}\n")
    first = realise(scenario)
    again = realise(scenario)
    saved = tmp_path / "realised.yaml"
    saved.write_text(first.to_yaml())
    reloaded = realise(load_scenario(saved))
    assert reloaded.scenario == first.scenario
    for name in ("client_flops", "p_max_w", "distance_ms_m", "distance_fs_m", "memory_bytes", "shadowing_ms_db",
                 "shadowing_fs_db", "gains_ms", "gains_fs", "downlink_gain_ms", "downlink_gain_fs"):
        np.testing.assert_array_equal(getattr(reloaded, name), getattr(first, name), err_msg=name)
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name), err_msg=name)
    assert reloaded.pairs == first.pairs
    other_seed = realise(scenario.model_copy(update={"seed": 4}))
    assert not np.array_equal(other_seed.gains_ms, first.gains_ms)
