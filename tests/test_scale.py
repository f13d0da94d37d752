"""The optimiser's city-scale paths against their plain definitions: the greedy's lazy preference and
incremental water-filling, the O(K M) screening of moves and swaps, the covering sampler's float
tables and its Python reading of numpy's PCG64 draws; the size bound; progress and clean --json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from sflllm.allocation import link as L
from sflllm.allocation.link import Link, greedy_assignment
from sflllm.allocation.optimize import MAX_SUBCHANNELS, optimise, phases
from sflllm.allocation.scenario import realise, scenario_from_mapping
from sflllm.cli import app

N0 = 10 ** ((-174 - 30) / 10)


def _link(rng: np.random.Generator, K: int, M: int, fading: str) -> Link:
    distance = rng.uniform(50, 300, K)
    gains = (10 ** (-(128.1 + 37.6 * np.log10(distance / 1000)) / 10))[:, None] * {
        "rayleigh": lambda: rng.exponential(size=(K, M)),
        "none": lambda: np.ones((K, M)),  # every subchannel of a client equal: ties everywhere
        "steps": lambda: rng.integers(1, 4, size=(K, M)).astype(float),  # a few values: many ties
    }[fading]()
    p_max = rng.uniform(0.1, 0.3, K)
    return Link(gains, 1e6, N0, p_max, p_max.sum() * 0.5)


def _plain_greedy(link: Link, c: np.ndarray, D: float, budget: np.ndarray) -> np.ndarray:
    """Spec §5 step 1 written plainly: full stable sort, water-filling from scratch every step."""
    k, m = link.gains.shape
    order = np.argsort(-link.snr, axis=1, kind="stable")
    owner = np.full(m, -1)

    def take(client):
        j = next(j for j in order[client] if owner[j] < 0)
        owner[j] = client

    def latency(client):
        mine = np.sort(link.snr[client, owner == client])[::-1]
        bits = L._Rows(mine[None, :]).max_rate(np.array([budget[client]]))[0]
        return c[client] + D / (link.bandwidth_hz * bits) if bits > 0 else math.inf

    for client in np.argsort(-c, kind="stable"):
        take(client)
    for _ in range(m - k):
        take(int(np.argmax([latency(i) for i in range(k)])))
    return owner


@pytest.mark.parametrize("K, M", [(2, 3), (3, 40), (6, 25), (12, 200)])
@pytest.mark.parametrize("fading", ["rayleigh", "none", "steps"])
def test_greedy_is_the_plain_greedy(K, M, fading):
    rng = np.random.default_rng(K * M)
    link = _link(rng, K, M, fading)
    c = rng.uniform(0, 2, K)
    for budget in (link.p_max_w, link.p_max_w * rng.uniform(0, 1, K)):
        np.testing.assert_array_equal(greedy_assignment(link, c, 1e7, budget_w=budget),
                                      _plain_greedy(link, c, 1e7, budget))


@pytest.mark.parametrize("count", [1, 3, 7, 30])
def test_stable_top_is_the_stable_sort_prefix(count):
    rng = np.random.default_rng(count)
    rows = rng.integers(0, 5, size=(20, 30)).astype(float)  # heavy ties
    rows[:5] = rng.random((5, 30))
    np.testing.assert_array_equal(L._stable_top(rows, count), np.argsort(-rows, axis=1, kind="stable")[:, :count])


def _screening_instance(rng, K, M, ties):
    owner = np.concatenate([np.arange(K), rng.integers(0, K, M - K)])
    rng.shuffle(owner)
    value = rng.integers(0, 4, size=(M, K)) * 1e-3 if ties else rng.exponential(1e-3, size=(M, K))
    value[rng.random((M, K)) < 0.2] = 0.0  # inactive
    held = value[np.arange(M), owner]
    gain = value - held[:, None]
    gain[np.arange(M), owner] = -np.inf
    return value, held, gain, owner


def _best(scores, keys, count):
    """The ``count`` largest scores (ties: lower key), as sorted keys: the screening's definition."""
    return np.sort(keys[np.lexsort((keys, -scores))[:count]])


@pytest.mark.parametrize("K, M", [(2, 300), (5, 200), (40, 120), (300, 700)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("fallback", [False, True])
def test_screening_picks_the_best_moves_and_swaps(K, M, ties, fallback, monkeypatch):
    """The pruned O(K M) screening, and its blocked fallback for swaps (forced here by a tiny
    capacity, with blocks of a few rows), pick exactly the moves and swaps that scoring every one
    of them would."""
    if fallback:
        monkeypatch.setattr(L, "SCREEN_CAPACITY", 1)
        monkeypatch.setattr(L, "_BLOCK", 5 * M)
    rng = np.random.default_rng(K + M + ties)
    value, held, gain, owner = _screening_instance(rng, K, M, ties)
    count = L.LOCAL_SEARCH_SCREENED

    r, j = np.nonzero(gain.T > -np.inf)
    keys = _best(gain.T[r, j], r * M + j, count)
    mv_r, mv_j = L._screen_moves(gain)
    np.testing.assert_array_equal(mv_r * M + mv_j, keys)

    j1, j2 = np.triu_indices(M, k=1)
    keep = owner[j1] != owner[j2]
    j1, j2 = j1[keep], j2[keep]
    keys = _best(L._swap_gain(value, held, owner, j1, j2), j1 * M + j2, count)
    sw_1, sw_2 = L._screen_swaps(value, held, gain, owner)
    np.testing.assert_array_equal(sw_1 * M + sw_2, keys)


def _exact_covering_chance(K: int, M: int) -> list[list[int]]:
    table = [[1] + [0] * K]
    for _ in range(M):
        prev = table[-1]
        table.append([(u * prev[u - 1] if u else 0) + (K - u) * prev[u] for u in range(K + 1)])
    return table


@pytest.mark.parametrize("K, M", [(1, 1), (3, 7), (20, 20), (30, 90), (64, 200)])
def test_covering_tables_match_exact_integers(K, M):
    exact = _exact_covering_chance(K, M)
    assert math.exp(L._log_covering(K, M)[M, K]) == pytest.approx(exact[M][K] / K**M, rel=1e-12)
    chance = L._new_client_chance(K, M)
    for r in range(1, M + 1):
        for u in range(1, K + 1):
            if exact[r][u]:
                assert chance[r, u] == pytest.approx(u * exact[r - 1][u - 1] / exact[r][u], rel=1e-12)


@pytest.mark.parametrize("generator", [np.random.PCG64, np.random.PCG64DXSM])
@pytest.mark.parametrize("seed", range(6))
def test_scalar_draws_are_numpys(generator, seed):
    """random() and integers(n) read from raw outputs equal numpy's, and leave the generator in the
    same state (also with a spare 32-bit half buffered at the start, and a range that rejects often)."""
    ours, numpy_rng = np.random.Generator(generator(seed)), np.random.Generator(generator(seed))
    if seed % 2:
        ours.integers(5), numpy_rng.integers(5)
    draws = L._ScalarDraws(ours)
    ops = np.random.default_rng(100 + seed)
    for _ in range(9000):  # more than one fetch of 4,096 outputs
        if ops.random() < 0.5:
            assert draws.random() == numpy_rng.random()
        else:
            n = int(ops.choice([1, 2, 3, 7, 1000, 2**31 + 5, 2**32 - 1, 3 * 2**30]))
            assert draws.integers(n) == numpy_rng.integers(n)
    draws.finish()
    assert ours.bit_generator.state == numpy_rng.bit_generator.state


def test_uniform_covering_reads_numpys_draws():
    """The covering sampler gives the same owners and generator state through its fast reader as
    through numpy's own scalar calls (a generator the reader does not handle)."""

    class Plain:  # numpy's calls on a PCG64 generator, hidden from the fast path
        def __init__(self, rng):
            self.rng, self.bit_generator = rng, None

        def random(self):
            return self.rng.random()

        def integers(self, n):
            return self.rng.integers(n)

    for K, M in [(20, 20), (50, 60), (300, 700)]:
        fast, plain = np.random.default_rng(K), np.random.default_rng(K)
        for _ in range(2):
            np.testing.assert_array_equal(L._uniform_covering(fast, K, M), L._uniform_covering(Plain(plain), K, M))
        assert fast.bit_generator.state == plain.bit_generator.state


def _run(*args):
    return CliRunner().invoke(app, ["optimize", *map(str, args)])


@pytest.mark.parametrize("field", ["ms_subchannels", "fs_subchannels"])
def test_too_many_subchannels_is_refused_before_any_work(tmp_path, field):
    path = tmp_path / "big.yaml"
    path.write_text(f"clients: {{count: 2}}\nnetwork: {{{field}: {MAX_SUBCHANNELS + 1}}}\n")
    result = _run("--scenario", path, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"network.{field}" in lines[0] and f"{MAX_SUBCHANNELS:,}" in lines[0]


def test_too_many_clients_times_subchannels_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("clients: {count: 3000}\nnetwork: {ms_subchannels: 3000, fs_subchannels: 3000}\n")
    result = _run("--scenario", path, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "network.ms_subchannels" in result.stderr and "clients.count" in result.stderr


def test_phases_are_announced_in_order():
    realised = realise(scenario_from_mapping({"clients": {"count": 3}, "network": {"ms_subchannels": 6,
                                                                                    "fs_subchannels": 4}}))
    for method in ("proposed", "exact"):
        seen: list[str] = []
        outcome = optimise(realised, method, on_phase=seen.append)
        assert seen == list(phases(method)) == list(outcome.timings_s)


def test_progress_keeps_json_stdout_clean(tmp_path, monkeypatch):
    """With progress shown (threshold lowered to 0), stdout is still exactly one JSON line whose gains
    are the realised ones bit for bit."""
    from sflllm.experiments import optimize_output

    monkeypatch.setattr(optimize_output, "PROGRESS_MIN_SIZE", 0)
    path = tmp_path / "s.yaml"
    path.write_text("seed: 3\nclients: {count: 4}\nnetwork: {ms_subchannels: 9, fs_subchannels: 5}\n"
                    "baselines: {random_draws: 2}\n")
    result = _run("--scenario", path, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    data = json.loads(result.stdout)
    from sflllm.allocation.scenario import load_scenario

    realised = realise(load_scenario(path))
    np.testing.assert_array_equal(np.array(data["scenario"]["network"]["gains_ms"]), realised.gains_ms)
    np.testing.assert_array_equal(np.array(data["scenario"]["network"]["gains_fs"]), realised.gains_fs)
