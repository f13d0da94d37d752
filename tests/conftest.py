"""Shared test fixtures: where the read-only shared data lives, and skipping clearly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
E2E_DIR = SHARED_DATA / "e2e"
STORIES260K = SHARED_DATA / "models" / "stories260K" / "hf"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def e2e_dir() -> Path:
    """The E2E NLG CSV/JSONL folder from ../shared/data/e2e."""
    return _require(E2E_DIR)


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """The real pretrained 260K-parameter Llama model (Hugging Face format) from ../shared/data."""
    return _require(STORIES260K / "config.json").parent



def _heavy_modules_imported(cli_args: list[str], modules: tuple[str, ...] = ("torch", "matplotlib", "transformers")) -> list[str]:
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from sflllm.cli import app; "
            f"r = CliRunner().invoke(app, {cli_args!r}); assert r.exit_code == 0, r.output; "
            f"print(','.join(sorted(m for m in {modules!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.fixture(scope="session")
def heavy_modules_imported():
    """``f(cli_args)``: which of torch/matplotlib/transformers a fresh interpreter imports running ``sflllm CLI_ARGS``."""
    return _heavy_modules_imported
