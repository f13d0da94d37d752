"""Thin command-line layer: parse options, hand them to ``sflllm.experiments``.

Implementations are imported inside each command so that ``sflllm optimize`` never imports torch.
"""

from __future__ import annotations

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
