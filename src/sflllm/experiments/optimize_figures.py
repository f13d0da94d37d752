"""Figures of an optimisation run (``sflllm optimize --plot DIR``), matplotlib Agg."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from sflllm.allocation.optimize import BASELINES, Outcome
from sflllm.files import FileInputError, ensure_output_dir


def _allocation_figure(outcome: Outcome, plt):
    from matplotlib.ticker import MaxNLocator

    solution = outcome.solution
    K = outcome.problem.realised.num_clients
    cmap = plt.get_cmap("tab20" if K > 10 else "tab10")
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.08 * len(solution.ms.owner) + 4), 6), constrained_layout=True)
    for ax, link, name in ((axes[0], solution.ms, "main server (MS) uplink"),
                           (axes[1], solution.fs, "federated server (FS) uplink")):
        x = np.arange(len(link.owner))
        ax.bar(x, link.power_w * 1e3, color=[cmap(k % cmap.N) for k in link.owner], edgecolor="black", linewidth=0.3)
        if K <= 20:
            for i, k in enumerate(link.owner):
                ax.text(i, link.power_w[i] * 1e3, str(k), ha="center", va="bottom", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("subchannel")
        ax.set_ylabel("power (mW)")
        ax.set_title(f"{name}: power per subchannel, colour/label = owner client")
    fig.suptitle(f"{solution.method}: l = {solution.split_layer}, r = {solution.rank}")
    return fig


def _breakdown_figure(outcome: Outcome, plt):
    solution, problem = outcome.solution, outcome.problem
    delay = solution.delay
    K = problem.realised.num_clients
    forward = problem.ms_fixed_latency(solution.pair_index)
    panels = (
        ("main server phase, per local iteration", {
            "client forward": forward,
            "activation upload": delay.uplink_s - forward,
            "gradient download + client backward": delay.downlink_s}, delay.uplink_s.max()),
        ("federated server phase, per round", {
            "adapter upload": delay.adapter_upload_s,
            "adapter broadcast": delay.adapter_broadcast_s}, None),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.22 * K + 2)), sharey=True, constrained_layout=True,
                             gridspec_kw={"width_ratios": [2, 1]})
    y = np.arange(K)
    colours = iter(plt.get_cmap("tab10").colors)
    for ax, (title, parts, straggler) in zip(axes, panels):
        left = np.zeros(K)
        for label, values in parts.items():
            ax.barh(y, values, left=left, label=label, color=next(colours))
            left += values
        if straggler is not None:
            ax.axvline(straggler, color="black", linestyle=":", linewidth=1, label="max_k T_up")
        ax.set_xlabel("seconds")
        ax.set_title(title)
    handles, labels = (sum(items, []) for items in zip(*(ax.get_legend_handles_labels() for ax in axes)))
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    axes[0].set_yticks(y if K <= 30 else y[::5])
    axes[0].invert_yaxis()
    axes[0].set_ylabel("client k")
    fig.suptitle(f"{solution.method}: per-client delays (l = {solution.split_layer}, r = {solution.rank}; "
                 f"server compute {delay.server_s:.3g} s per iteration)")
    return fig


def _search_figure(outcome: Outcome, plt):
    pairs = outcome.problem.terms.pairs
    totals = outcome.optimiser.proposed_totals()
    layers = sorted({l for l, _ in pairs})
    ranks = sorted({r for _, r in pairs})
    grid = np.full((len(layers), len(ranks)), np.nan)
    for (l, r), value in zip(pairs, totals):
        grid[layers.index(l), ranks.index(r)] = value
    fig, (ax_map, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True,
                                         gridspec_kw={"width_ratios": [1.1, 1]})
    image = ax_map.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
    ax_map.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax_map.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax_map.set_xlabel("LoRA rank r")
    ax_map.set_ylabel("split layer l")
    best = outcome.proposed
    ax_map.plot(ranks.index(best.rank), layers.index(best.split_layer), marker="*", color="red", markersize=14)
    ax_map.set_title("proposed: total delay T_total (s) per (l, r); * = best")
    fig.colorbar(image, ax=ax_map, label="T_total (s)")
    names = ["proposed", *BASELINES]
    values = [outcome.proposed.total_delay_s, *(outcome.baselines[name] for name in BASELINES)]
    bars = ax_bar.bar(names, values, color=["tab:red"] + ["tab:gray"] * len(BASELINES))
    for bar, value in zip(bars, values):
        ax_bar.text(bar.get_x() + bar.get_width() / 2, value, f"{value / values[0]:.2f}x", ha="center", va="bottom")
    ax_bar.set_ylabel("T_total (s)")
    ax_bar.set_title("proposed vs baselines (ratio to proposed)")
    ax_bar.tick_params(axis="x", rotation=30)
    return fig


FIGURES = {
    "allocation.png": _allocation_figure,
    "delay_breakdown.png": _breakdown_figure,
    "delay_vs_pairs_and_baselines.png": _search_figure,
}


def write_figures(outcome: Outcome, plot_dir: Path) -> tuple[Path, ...]:
    """Render every figure, then move them into ``plot_dir`` (created if needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ensure_output_dir(plot_dir, "--plot")
    written = []
    try:
        with tempfile.TemporaryDirectory(dir=plot_dir, prefix=".figures-") as staging:
            for name, draw in FIGURES.items():
                fig = draw(outcome, plt)
                fig.savefig(Path(staging) / name, dpi=120)
                plt.close(fig)
            for name in FIGURES:
                os.replace(Path(staging) / name, plot_dir / name)
                written.append(plot_dir / name)
    except OSError as exc:
        raise FileInputError(f"--plot {plot_dir}: cannot write the figures ({exc.strerror or exc})") from None
    return tuple(written)
