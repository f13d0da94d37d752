"""Thin command-line layer: parse options, hand them to ``sflllm.experiments``.

Implementations are imported inside each command so that ``sflllm optimize`` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Split federated LoRA fine-tuning of LLMs, and the joint resource-allocation optimiser.",
)

# `sflllm train` is defined in this file by the SFL-engine work; `sflllm optimize` by the optimiser work.


@app.callback()
def main() -> None:
    """sflllm: split federated LoRA fine-tuning over communication networks."""


@app.command()
def optimize(
    scenario: Annotated[Path, typer.Option("--scenario", help="YAML 1.2 scenario file (spec §6); missing fields take their defaults.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (spec §8) instead of tables.")] = False,
    method: Annotated[str, typer.Option(help="proposed | exact | random_subchannel | equal_power | fixed_split | fixed_rank | random_all.")] = "proposed",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write PNG figures (allocation, delay breakdown, (l, r) search, baselines) into this folder.")] = None,
    save_realised: Annotated[Path | None, typer.Option("--save-realised", help="Write the realised scenario (every draw explicit) to this YAML file.")] = None,
) -> None:
    """Jointly optimise subchannels, power, split layer and LoRA rank to minimise the training delay."""
    from rich.console import Console

    from sflllm.experiments.optimize import OptimizeInputError, print_run, run_optimize

    try:
        run = run_optimize(scenario, method=method, plot_dir=plot, save_realised=save_realised)
    except OptimizeInputError as e:
        Console(stderr=True).print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    print_run(run, as_json=as_json, console=Console())
