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
