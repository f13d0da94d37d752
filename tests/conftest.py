"""Shared test fixtures: where the read-only shared data lives, and skipping clearly when it is absent."""

from __future__ import annotations

import ast
import subprocess
import sys
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


HEAVY_MODULES = ("torch", "transformers", "peft", "matplotlib")


def heavy_modules_imported(*cli_args: str) -> list[str]:
    """Which of ``HEAVY_MODULES`` a fresh interpreter has imported after ``sflllm CLI_ARGS`` succeeds."""
    code = ("import sys; from typer.testing import CliRunner; from sflllm.cli import app; "
            f"r = CliRunner().invoke(app, {list(cli_args)!r}); assert r.exit_code == 0, r.output; "
            f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in offline word-level demo tokenizer."""
    from sflllm.data import build_demo_tokenizer

    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one torch intra-op thread is faster than two (intra-op threads cost more in
    synchronisation than they save, badly so on a loaded box); a module's tests share it, restored after.
    Use it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_SCENARIO = """\
seed: 1
model: {seq_len: 104}
training: {batch_size: 4, local_steps: 2, ranks: [2, 4], rounds_per_rank: {2: 3, 4: 2}}
clients: {count: 2}
network: {ms_subchannels: 6, fs_subchannels: 4}
baselines: {random_draws: 3}
"""


@pytest.fixture(scope="session")
def tiny_scenario_file(tmp_path_factory) -> Path:
    """A scenario small enough for the built-in demo model to run in seconds (K=2, I=2, b=4, ranks 2 and 4)."""
    path = tmp_path_factory.mktemp("scenario") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path
