"""`python -m sflllm`: the same as the `sflllm` command."""

from sflllm.cli import app

app(prog_name="sflllm")
