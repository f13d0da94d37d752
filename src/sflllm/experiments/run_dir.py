"""The output folder of a training run, checked before any heavy import or work (no torch here).

``sflllm train`` refuses an output folder it would have to mix files into, and one it cannot create,
before loading torch, the model or the data, so such errors take well under a second.
"""

from __future__ import annotations

import time
from pathlib import Path

from sflllm.experiments.config import TrainInputError
from sflllm.files import FileInputError, check_creatable_dir

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.safetensors"


def default_output_dir() -> Path:
    """``runs/<YYYYmmdd-HHMMSS>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def check_new_output_dir(out: Path) -> None:
    """Raise TrainInputError unless ``out`` is absent or an empty folder that can be created/written.

    A non-empty ``out`` that holds a run (its config.yaml) suggests ``--resume``; any other
    non-empty folder suggests another ``--output``.
    """
    if out.exists() and not out.is_dir():
        raise TrainInputError(f"output {out} exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        if (out / CONFIG_FILE).is_file():
            raise TrainInputError(
                f"output {out} already exists and holds a run; continue it with --resume {out} or choose another --output"
            )
        raise TrainInputError(f"output {out} is a folder of other files; choose another (new or empty) --output")
    try:
        check_creatable_dir(out, "output")
    except FileInputError as e:
        raise TrainInputError(str(e)) from None


def check_resumable(out: Path) -> None:
    """Raise TrainInputError unless ``out`` holds a run of ``sflllm train`` (its config.yaml)."""
    if not (out / CONFIG_FILE).is_file():
        raise TrainInputError(f"resume: {out / CONFIG_FILE} not found; is {out} the output of `sflllm train`?")
