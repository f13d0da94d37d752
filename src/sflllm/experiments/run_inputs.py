"""What ``sflllm run`` and ``sflllm calibrate`` share: their common options, the demo scenario, the
trained model's profile and identity, one training run per (split layer, rank), and its resumption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from rich.console import Console

from sflllm.allocation.scenario import Scenario, ScenarioError, load_scenario, scenario_from_mapping
from sflllm.cost.profile import ModelProfile, profile_from_config
from sflllm.experiments.config import TrainConfig, TrainInputError, describe_validation_error, read_config_file
from sflllm.experiments.run_options import TrainingInputs
from sflllm.experiments.train import (
    METRICS_FILE,
    STATE_FILE,
    TrainResult,
    default_output_dir,
    resume_train,
    run_train,
)

# The offline demo's scenario: the spec §6 defaults, except what fits the built-in tiny model and a
# 3-minute run on 2 cores (K, I, b, s, the rank set, fewer subchannels), with E(r) measured on it by
# `sflllm calibrate --max-rounds 14 --target-loss 3.4` (rank 1, which needs 14 rounds, is left out to
# keep the demo short). DEMO_TARGET_LOSS is that target; the demo uses it unless told otherwise.
DEMO_SCENARIO: dict[str, Any] = {
    "seed": 0,
    "model": {"seq_len": 104},
    "training": {"batch_size": 8, "local_steps": 4, "ranks": [2, 4, 8], "rounds_per_rank": {2: 8, 4: 7, 8: 7}},
    "clients": {"count": 3},
    "network": {"ms_subchannels": 12, "fs_subchannels": 6},
}
DEMO_TARGET_LOSS = 3.4


def model_source(model: str | None) -> str:
    """How a run names its model: ``demo`` for the built-in one, a local dir as an absolute path."""
    return "demo" if model is None else data_source(model)


def data_source(source: str | None) -> str | None:
    """A local file or folder as an absolute path (so that two spellings compare equal); a hub id as given."""
    if source is None:
        return None
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


def architecture_digest(profile: ModelProfile) -> str:
    """A short digest of the model's architecture numbers (what the delay model sees of the model)."""
    return hashlib.sha256(repr(profile).encode()).hexdigest()[:16]


def max_lora_rank(profile: ModelProfile) -> int:
    """The largest rank every LoRA target can take: min over the targets of min(d_in, d_out)."""
    return min(min(layer.d_in, layer.d_out) for layer in profile.target_linears)


def check_ranks(ranks: list[int], profile: ModelProfile, field: str = "training.ranks") -> None:
    """A rank above some target's min(d_in, d_out) is not a low-rank adapter of it: an error naming it."""
    limit = max_lora_rank(profile)
    bad = [r for r in ranks if r > limit]
    if bad:
        raise TrainInputError(f"{field}: rank(s) {bad} exceed {limit}, the largest rank the model's LoRA targets "
                              f"({', '.join(profile.lora_targets)}) can take (min of their input and output widths)")


def model_profile(model: Any, lora_targets: list[str] | None) -> ModelProfile:
    """The spec §2 profile of a loaded HF model, from its own config (not a preset)."""
    try:
        return profile_from_config(model.config.to_dict(), lora_targets, source="the trained model's config")
    except ValueError as e:
        raise TrainInputError(str(e)) from None


def load_run_scenario(options: TrainingInputs) -> Scenario:
    try:
        if options.scenario is None:
            return scenario_from_mapping(DEMO_SCENARIO)
        return load_scenario(options.scenario)
    except ScenarioError as e:
        raise TrainInputError(f"scenario: {e}" if options.scenario is None else str(e)) from None


def pair_train_config(options: TrainingInputs, scenario: Scenario, l: int, r: int, bits: int,
                      rounds: int) -> TrainConfig:
    values = dict(model=options.model, data=options.data, eval_data=options.eval_data,
                  train_samples=options.train_samples, eval_samples=options.eval_samples,
                  clients=scenario.clients.count, split_layer=l, rank=r, lora_targets=scenario.model.lora_targets,
                  local_steps=scenario.training.local_steps, batch_size=scenario.training.batch_size,
                  seq_len=scenario.model.seq_len, seed=scenario.seed, act_bits=bits, rounds=rounds,
                  device=options.device, dtype=options.dtype)
    if options.lr is not None:
        values["lr"] = options.lr
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        raise TrainInputError(f"scenario: {describe_validation_error(e)}") from None


def train_pair(folder: Path, config: TrainConfig, console: Console, progress: bool) -> TrainResult:
    """Train one (l, r) into ``folder``, resuming what a previous attempt left there."""
    if (folder / STATE_FILE).is_file():
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
        if len(metrics["rounds"]) >= config.rounds:
            return TrainResult(folder, metrics)
        return resume_train(folder, {"rounds": config.rounds}, console=console, progress=progress)
    if folder.is_dir() and any(folder.iterdir()):  # stopped in its first round: resume_train restarts it
        return resume_train(folder, {"rounds": config.rounds}, console=console, progress=progress)
    return run_train(config, folder, console=console, progress=progress)


Options = TypeVar("Options", bound=BaseModel)


def output_folder(output_dir: Path | None, *, resume: bool, options_file: str, command: str) -> Path:
    """The output folder: for ``--resume`` one that holds ``options_file``; otherwise new or empty."""
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    if resume:
        if not (out / options_file).is_file():
            raise TrainInputError(f"resume: {out / options_file} not found; is {out} the output of `sflllm {command}`?")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainInputError(f"output {out} already exists and is not empty; continue it with --resume {out} "
                              "or choose another --output")
    return out


def saved_options(out: Path, options_file: str, cls: type[Options], relative: tuple[str, ...] = ()) -> Options:
    """The options a run saved in ``out / options_file``; the fields in ``relative`` are paths relative to ``out``."""
    values = read_config_file(out / options_file)
    for key in relative:
        if values.get(key) is not None and not Path(values[key]).is_absolute():
            values[key] = str(out / values[key])
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise TrainInputError(f"resume: {out / options_file}: {describe_validation_error(e)}") from None
