"""The outputs of ``sflllm run`` in its folder: metrics.json, curves.csv, figures and report.md.

Every file is written atomically (``experiments.checkpoint.write_atomic``); figures are rendered
by :mod:`sflllm.experiments.run_figures`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sflllm.experiments.checkpoint import write_atomic, write_json_atomic

if TYPE_CHECKING:
    from sflllm.experiments.closed_loop import Plan

REPORT_FILE = "report.md"
RUN_METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.csv"
CURVE_COLUMNS = ("method", "split_layer", "rank", "round", "round_delay_s", "sim_time_s", "wall_time_s",
                 "heldout_loss", "train_loss")


def curves_csv(metrics: dict[str, Any]) -> str:
    """One row per method and round: pair, T_round, simulated and measured time so far, losses."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for method, record in metrics["methods"].items():
        for row in record["rounds"]:
            writer.writerow([method, record["split_layer"], record["rank"], row["round"],
                             repr(row["round_delay_s"]), repr(row["sim_time_s"]), repr(row["wall_time_s"]),
                             repr(row["heldout_loss"]), repr(row["train_loss"])])
    return buf.getvalue()


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:,.4g} s"


def headline_markdown(metrics: dict[str, Any]) -> str:
    """The headline table: time to the target loss per method and proposed's reduction against it."""
    lines = ["| method | (l, r) | E(r) planned | rounds to target | simulated time to target | final held-out loss | "
             "proposed's reduction |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in metrics["headline"]:
        reduction = row["reduction_by_proposed"]
        if row["method"] == "proposed":
            shown = ""
        elif reduction is None:
            shown = "n/a"
        else:
            shown = f"{100 * reduction:.1f}%"
        lines.append(f"| {row['method']} | ({row['split_layer']}, {row['rank']}) | {row['planned_rounds']} | "
                     f"{row['rounds_to_target'] if row['rounds_to_target'] is not None else 'not reached'} | "
                     f"{_seconds(row['time_to_target_s'])} | {row['final_heldout_loss']:.4f} | {shown} |")
    return "\n".join(lines)


def _runs(owner: list[int], client: int) -> str:
    idx = [i for i, k in enumerate(owner) if k == client]
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def allocation_markdown(round_record: dict[str, Any], clients: int) -> str:
    """Per client: subchannels, total power and rate on the main-server and federated-server uplinks."""
    lines = ["| client | MS subchannels | MS power (W) | MS rate (Mbit/s) | FS subchannels | FS power (W) | "
             "FS rate (Mbit/s) |", "| ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    power = {link: np.bincount(round_record[f"assignment_{link}"], weights=round_record[f"power_{link}_w"],
                               minlength=clients) for link in ("ms", "fs")}
    for k in range(clients):
        lines.append(
            f"| {k} | {_runs(round_record['assignment_ms'], k)} | {power['ms'][k]:.4f} | "
            f"{round_record['rate_ms_bps'][k] / 1e6:.3f} | {_runs(round_record['assignment_fs'], k)} | "
            f"{power['fs'][k]:.4f} | {round_record['rate_fs_bps'][k] / 1e6:.3f} |")
    return "\n".join(lines)


def timeline_markdown(metrics: dict[str, Any]) -> str:
    """Per method: T_round over the rounds (first, mean, min, max), and simulated vs measured time."""
    lines = ["| method | T_round first | mean | min | max | simulated time, all rounds | measured training time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, record in metrics["methods"].items():
        t = np.array([row["round_delay_s"] for row in record["rounds"]])
        lines.append(f"| {method} | {t[0]:.4g} s | {t.mean():.4g} s | {t.min():.4g} s | {t.max():.4g} s | "
                     f"{record['final_sim_time_s']:.4g} s | {record['rounds'][-1]['wall_time_s']:.3g} s |")
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any], figures: dict[str, str]) -> str:
    """report.md: the scenario, the choice, allocation tables, the timeline, the headline, the figures."""
    sc, chosen = metrics["scenario"], metrics["chosen"]
    proposed = metrics["methods"]["proposed"]
    rounds_per_rank = ", ".join(f"E({r}) = {e}" for r, e in sc["rounds_per_rank"].items())
    out = [
        "# sflllm run: split federated LoRA, optimised and trained",
        "",
        "## Scenario",
        "",
        f"- model: `{metrics['model']}` (L = {sc['num_layers']} blocks; the delay model uses this model's own "
        "config, not a preset)",
        f"- K = {sc['clients']} clients, I = {sc['local_steps']} local iterations per round, b = {sc['batch_size']}, "
        f"s = {sc['seq_len']} tokens; cut precision {metrics['act_bits']} bits; seed {sc['seed']}",
        f"- network: {sc['ms_subchannels']} main-server and {sc['fs_subchannels']} federated-server uplink "
        f"subchannels; {metrics['fading']} fading"
        + (" (small-scale fading redrawn and the allocation re-solved every round)" if metrics["fading"] == "block"
           else ""),
        f"- allowed split layers {sc['split_layers']}, ranks {sc['ranks']}; {rounds_per_rank}",
        "- the realised scenario (every draw explicit) is `scenario.yaml`; the run's options `run.yaml`",
    ]
    out += [f"- note: {line}" for line in metrics["overrides"]]
    out += [
        "",
        "## The choice",
        "",
        f"proposed: split layer l = {chosen['split_layer']}, LoRA rank r = {chosen['rank']} "
        f"(E(r) = {chosen['rounds_E']}); "
        f"the optimiser's planned T_total {chosen['planned_total_delay_s']:.4g} s.",
        "",
        "| method | (l, r) | planned T_total (optimiser) |",
        "| --- | --- | ---: |",
    ]
    for method, record in metrics["methods"].items():
        out.append(f"| {method} | ({record['split_layer']}, {record['rank']}) | "
                   f"{metrics['planned_total_delay_s'][method]:.4g} s |")
    out += ["", "Random baselines train with their first draw's (l, r) and draw a fresh assignment every round.",
            "", "## Allocation of proposed (round 1)", "", allocation_markdown(proposed["rounds"][0], sc["clients"]),
            "", "## Per-round timeline", "",
            f"{metrics['rounds']} rounds per (l, r); T_round is spec §4's I T_iter + T_agg for the allocation "
            "in force.",
            "", timeline_markdown(metrics), "",
            "## Headline: simulated time to the target loss", "",
            f"Target held-out loss {metrics['target_loss']:.4f} ({metrics['target_source']}). Reduction = "
            "1 - T_proposed / T_method.", "", headline_markdown(metrics), ""]
    precision = metrics.get("precision")
    if precision is not None:
        out += ["## Cost of the cut precision (measured)", "",
                f"Proposed's (l, r) trained again with a {precision['reference_bits']}-bit cut on the same data and seed: "
                f"final held-out loss {precision['final_heldout_loss']:.4f} at {precision['act_bits']} bits vs "
                f"{precision['reference_final_heldout_loss']:.4f} at {precision['reference_bits']} bits (difference "
                f"{precision['final_loss_cost']:+.4f}; largest per-round gap {precision['max_round_loss_gap']:.4f}). "
                f"Time to target: {_seconds(precision['time_to_target_s'])} at {precision['act_bits']} bits vs "
                f"{_seconds(precision['reference_time_to_target_s'])} at {precision['reference_bits']} bits (T_round at "
                f"{precision['reference_bits']} bits {precision['reference_round_delay_s']:.4g} s).", ""]
    search = metrics.get("precision_search")
    if search:
        best = min(search.values(), key=lambda row: row["planned_total_delay_s"])["planned_total_delay_s"]
        out += ["## Joint choice of (l, r, cut precision)", "",
                f"E(r) was calibrated at each precision; the search chose {metrics['act_bits']} bits. Planned T_total "
                "of proposed's best (l, r) at each precision:", "",
                "| act_bits | (l, r) | E(r) | planned T_total | chosen precision saves |", "| ---: | --- | ---: | ---: | ---: |"]
        for bits, row in search.items():
            saving = 1 - best / row["planned_total_delay_s"]
            out.append(f"| {bits} | ({row['split_layer']}, {row['rank']}) | {row['rounds']} | "
                       f"{row['planned_total_delay_s']:.4g} s | {100 * saving:.1f}% |")
        out += ["", "What the choice of (l, r) saves at the chosen precision is the headline's fixed_split and "
                "fixed_rank columns; what the allocation saves, its equal_power and random_subchannel columns.", ""]
    out += ["## Figures", ""]
    out += [f"- {caption}: `{name}`" for name, caption in figures.items()]
    out += ["", "Machine-readable: `metrics.json` (per method and round: T_round, simulated and measured time, "
            "held-out loss, the allocation in force), `curves.csv`; each (l, r)'s training run is in `pairs/`.", ""]
    return "\n".join(out)


def write_outputs(out: Path, plan: "Plan", metrics: dict[str, Any]) -> Path:
    """metrics.json, curves.csv, the PNGs and report.md into ``out``; returns report.md's path."""
    from sflllm.experiments.run_figures import write_run_figures

    write_json_atomic(out / RUN_METRICS_FILE, metrics)
    write_atomic(out / CURVES_FILE, curves_csv(metrics).encode("utf-8"))
    figures = write_run_figures(metrics, out)
    report = out / REPORT_FILE
    write_atomic(report, report_markdown(metrics, figures).encode("utf-8"))
    return report
