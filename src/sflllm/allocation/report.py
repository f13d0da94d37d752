"""The spec §8 machine-readable result and the human-readable tables of an optimisation run."""

from __future__ import annotations

from typing import Any

import numpy as np

from sflllm.allocation.optimize import BASELINES, Outcome, Solution


def plain(value: Any) -> Any:
    """numpy scalars/arrays (and tuples) to plain Python, recursively, for json.dumps."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def profile_table(outcome: Outcome) -> dict[str, dict[str, float]]:
    """Spec §8 "profile": {"l,r": {F_c, B_c, S, A, Y, G, Lam}} for every allowed pair."""
    terms = outcome.problem.terms
    fields = vars(terms.numbers)  # arrays over pairs, computed once by build_problem
    return {f"{l},{r}": {key: float(values[i]) for key, values in fields.items()}
            for i, (l, r) in enumerate(terms.pairs)}


def result_json(outcome: Outcome) -> dict[str, Any]:
    """The spec §8 object (every required key, plus rates and per-method details).

    For a random baseline the pair and allocation shown are its first draw's, while ``total_delay_s``,
    ``round_delay_s``, ``iteration_delay_s`` and ``breakdown`` are means over its ``random_draws``
    draws (as in "baselines"; the mean breakdown adds up to the mean total, spec §8);
    ``draw_total_delay_s`` is the first draw's own T_total and ``draws`` the number of draws.
    The scenario's gain matrices are the realised scenario's own lists (not copies): do not mutate them.
    """
    solution = outcome.solution
    delay = solution.delay
    result = {
        "method": solution.method,
        "split_layer": solution.split_layer,
        "rank": solution.rank,
        "rounds": outcome.problem.realised.rounds(solution.rank),
        "total_delay_s": solution.total_delay_s,
        "round_delay_s": solution.round_delay_s,
        "iteration_delay_s": solution.iteration_delay_s,
        "assignment_ms": solution.ms.owner,
        "assignment_fs": solution.fs.owner,
        "power_ms_w": solution.ms.power_w,
        "power_fs_w": solution.fs.power_w,
        "rate_ms_bps": solution.ms.rate_bps,
        "rate_fs_bps": solution.fs.rate_bps,
        "breakdown": solution.breakdown,
        "baselines": outcome.baselines,
        "proposed_total_delay_s": outcome.proposed.total_delay_s,
        "scenario": None,  # filled in below, without a copy of the gains
        "profile": profile_table(outcome),
        "solve_time_s": outcome.solve_time_s,
        "timings_s": outcome.timings_s,
    }
    if solution.draws > 1:
        result["draws"] = solution.draws
        result["draw_total_delay_s"] = delay.total_delay_s
    result = plain(result)
    result["scenario"] = scenario_json(outcome.problem.realised.scenario)
    return result


_GAIN_FIELDS = ("gains_ms", "gains_fs")


def scenario_json(scenario) -> dict[str, Any]:
    """The realised scenario as plain JSON values; the K x M gain matrices are the scenario's own lists.

    They hold K (M + N) floats (5.5 million at K = 1,000, M = N = 2,730): dumping and walking a copy of
    them took more time and memory than the whole solve, so they are shared rather than copied (they
    are already plain lists of floats, spec §8).
    """
    dumped = scenario.model_dump(mode="json", exclude={"network": set(_GAIN_FIELDS)})
    network = dumped["network"]
    for name in _GAIN_FIELDS:
        network[name] = getattr(scenario.network, name)
    dumped["network"] = {key: network[key] for key in type(scenario.network).model_fields}  # field order kept
    return dumped


def _subchannels(owner: np.ndarray, client: int) -> str:
    """The client's subchannel indices with runs shortened: ``0-3, 7, 9-10`` (wraps at the spaces)."""
    runs: list[list[int]] = []
    for i in np.flatnonzero(owner == client).tolist():
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _allocation_table(title: str, owner: np.ndarray, power_w: np.ndarray, rate_bps: np.ndarray, extra=(),
                      caption: str | None = None):
    """Per client: subchannel count and list (folded, never cut), power and rate; then ``extra`` columns.

    ``extra`` is a sequence of (header, per-client strings).  Narrow headers so that the table fits 80
    columns; the list column takes what is left and wraps.
    """
    from rich.table import Table

    K = len(rate_bps)
    power = np.bincount(owner, weights=power_w, minlength=K)
    table = Table(title=title, caption=caption)
    table.add_column("k", justify="right")
    table.add_column("n", justify="right")
    table.add_column("subchannels", overflow="fold", ratio=1)
    table.add_column("P (W)", justify="right", no_wrap=True)
    table.add_column("R (Mbit/s)", justify="right", no_wrap=True)
    for header, _ in extra:
        table.add_column(header, justify="right", no_wrap=True)
    counts = np.bincount(owner, minlength=K)
    for k in range(K):
        table.add_row(str(k), str(counts[k]), _subchannels(owner, k), f"{power[k]:.4f}",
                      f"{rate_bps[k] / 1e6:.2f}", *(values[k] for _, values in extra))
    return table


def render(outcome: Outcome, console) -> None:
    """Rich tables: the chosen pair, per client both links' allocation and delays, the comparison."""
    from rich.table import Table

    solution: Solution = outcome.solution
    delay = solution.delay
    realised = outcome.problem.realised
    training = realised.scenario.training

    summary = Table(title=f"sflllm optimize: {solution.method}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    rows = [
        ("split layer l / rank r", f"{solution.split_layer} / {solution.rank}"),
        ("rounds E(r)", str(realised.rounds(solution.rank))),
        ("total delay T_total", f"{solution.total_delay_s:,.2f} s"),
        ("round delay T_round", f"{solution.round_delay_s:,.3f} s"),
        ("iteration delay T_iter", f"{solution.iteration_delay_s:,.4f} s"),
        ("server compute K b S / f_s", f"{delay.server_s:,.4f} s"),
        *[(f"breakdown: {key.removesuffix('_s').replace('_', ' ')}", f"{value:,.2f} s")
          for key, value in solution.breakdown.items()],
        ("solve time", f"{outcome.solve_time_s:.3f} s"),
    ]
    if solution.draws > 1:
        rows.insert(3, (f"(mean of {solution.draws} draws; the first, shown below)", f"{delay.total_delay_s:,.2f} s"))
    for row in rows:
        summary.add_row(*row)
    console.print(summary)

    c = outcome.problem.ms_fixed_latency(solution.pair_index)
    K = realised.num_clients
    console.print(_allocation_table("main server link: allocation per client", solution.ms.owner,
                                    solution.ms.power_w, solution.ms.rate_bps,
                                    caption="n subchannels; P: their total power; R: rate"))

    delays = Table(title=f"main server link: delays (s) per local iteration (b = {training.batch_size})",
                   caption="T_up = forward + upload; T_down = download + backward")
    for name in ("k", "f (TFLOP/s)", "forward", "upload", "T_up", "T_down"):
        delays.add_column(name, justify="right")
    for k in range(K):
        delays.add_row(str(k), f"{realised.client_flops[k] / 1e12:.3g}", f"{c[k]:.4f}",
                       f"{delay.uplink_s[k] - c[k]:.4f}", f"{delay.uplink_s[k]:.4f}", f"{delay.downlink_s[k]:.4f}")
    console.print(delays)

    fs_table = _allocation_table(
        "federated server link: per client and round (client adapter)", solution.fs.owner, solution.fs.power_w,
        solution.fs.rate_bps,
        [("upload (s)", [f"{v:.4f}" for v in delay.adapter_upload_s]),
         ("broadcast (s)", [f"{v:.4f}" for v in delay.adapter_broadcast_s])],
        caption="upload: client to FS; broadcast: FS to client (downlink)")
    console.print(fs_table)

    comparison = Table(title="comparison (T_total; random baselines: mean over draws)")
    comparison.add_column("method")
    comparison.add_column("total delay s", justify="right")
    comparison.add_column("ratio to proposed", justify="right")
    reference = outcome.proposed.total_delay_s
    entries = [("proposed", reference)]
    if solution.method == "exact":
        entries.insert(0, ("exact", solution.total_delay_s))
    entries += [(name, outcome.baselines[name]) for name in BASELINES]
    for name, value in entries:
        comparison.add_row(name, f"{value:,.2f}", f"{value / reference:.3f}")
    console.print(comparison)
