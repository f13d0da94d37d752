"""Figures of ``sflllm run`` (matplotlib Agg), drawn from its metrics.json content alone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

BREAKDOWN_PARTS = (("client_compute_s", "client compute"), ("uplink_s", "uplink"),
                   ("server_compute_s", "server compute"), ("downlink_s", "downlink"),
                   ("aggregation_s", "aggregation"))


def _loss_vs_time(metrics: dict[str, Any], plt):
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for method, record in metrics["methods"].items():
        times = [0.0] + [row["sim_time_s"] for row in record["rounds"]]
        losses = [record["initial_heldout_loss"]] + [row["heldout_loss"] for row in record["rounds"]]
        ax.plot(times, losses, marker="o", markersize=3, linewidth=2.5 if method == "proposed" else 1.2,
                label=f"{method} (l={record['split_layer']}, r={record['rank']})")
    ax.axhline(metrics["target_loss"], color="black", linestyle=":", linewidth=1, label="target loss")
    ax.set_xlabel("simulated wall-clock time (s, delay model)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"held-out loss vs simulated time ({metrics['fading']} channels, {metrics['act_bits']}-bit cut)")
    ax.legend(fontsize=8)
    return fig


def _breakdown(metrics: dict[str, Any], plt):
    methods = list(metrics["methods"])
    fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
    bottom = np.zeros(len(methods))
    for key, label in BREAKDOWN_PARTS:
        values = np.array([np.mean([row["breakdown"][key] for row in metrics["methods"][m]["rounds"]])
                           for m in methods])
        ax.bar(methods, values, bottom=bottom, label=label)
        bottom += values
    ax.set_ylabel("seconds per round (mean over rounds)")
    ax.set_title("per-round delay breakdown (spec §8: each phase at its straggler)")
    ax.tick_params(axis="x", rotation=25)
    ax.legend(fontsize=8)
    return fig


def _allocation(metrics: dict[str, Any], plt):
    first = metrics["methods"]["proposed"]["rounds"][0]
    K = metrics["scenario"]["clients"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), constrained_layout=True)
    x = np.arange(K)
    for row, (link, name) in enumerate((("ms", "main-server uplink"), ("fs", "federated-server uplink"))):
        owner = np.asarray(first[f"assignment_{link}"])
        axes[row, 0].bar(x, np.bincount(owner, minlength=K), color="tab:blue")
        axes[row, 0].set_ylabel("subchannels")
        axes[row, 1].bar(x, 1e3 * np.bincount(owner, weights=first[f"power_{link}_w"], minlength=K), color="tab:orange")
        axes[row, 1].set_ylabel("power (mW)")
        for ax in axes[row]:
            ax.set_xticks(x)
            ax.set_xlabel("client")
            ax.set_title(name)
    chosen = metrics["chosen"]
    fig.suptitle(f"proposed allocation, round 1 (l = {chosen['split_layer']}, r = {chosen['rank']})")
    return fig


def _round_delay(metrics: dict[str, Any], plt):
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for method, record in metrics["methods"].items():
        ax.plot([row["round"] for row in record["rounds"]], [row["round_delay_s"] for row in record["rounds"]],
                marker="o", markersize=3, linewidth=2.5 if method == "proposed" else 1.2, label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("T_round (s)")
    ax.set_title("T_round per round (block fading: allocation re-solved every round)")
    ax.legend(fontsize=8)
    return fig


def figure_set(metrics: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """file name -> (caption, drawing function); T_round per round only with block fading."""
    figures = {
        "loss_vs_time.png": ("held-out loss against simulated time, one line per method", _loss_vs_time),
        "delay_breakdown.png": ("per-round delay breakdown per method, stacked", _breakdown),
        "allocation.png": ("proposed's subchannels and power per client on both uplinks", _allocation),
    }
    if metrics["fading"] == "block":
        figures["round_delay.png"] = ("T_round per round with block fading", _round_delay)
    return figures


def write_run_figures(metrics: dict[str, Any], out: Path) -> dict[str, str]:
    """Render every figure into ``out`` (each moved into place when drawn); returns name -> caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".figures-") as staging:
        for name, (caption, draw) in figure_set(metrics).items():
            fig = draw(metrics, plt)
            fig.savefig(Path(staging) / name, dpi=110)
            plt.close(fig)
            os.replace(Path(staging) / name, out / name)
            written[name] = caption
    return written
