"""``python -m sflllm``: the ``sflllm`` command."""

from sflllm.cli import app

app(prog_name="sflllm")
