"""The options of ``sflllm run`` and ``sflllm calibrate``, declared once (torch-free: the CLI derives
both commands' flags from these fields before anything heavy loads)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sflllm.allocation.scenario import Scenario
from sflllm.cost.profile import activation_bits
from sflllm.experiments.config import DataSource, TrainConfig


def _train_field(name: str) -> Any:
    """TrainConfig's declaration of field ``name`` (type, default, checks, help), reused as it is."""
    field = TrainConfig.model_fields[name]
    return Annotated[field.annotation, field]


class TrainingInputs(BaseModel):
    """The options ``sflllm run`` and ``sflllm calibrate`` share: scenario, model, data, lr, cut
    precision, device and dtype.  The CLI derives both commands' options from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: str | None = Field(None, description="scenario YAML (spec §6): K, I, b, s, seed, ranks, E(r), clients, "
                                 "network; None: the built-in demo scenario")
    model: str | None = Field(None, description="HF model name or local dir; None: the built-in tiny demo model")
    data: DataSource = Field(None, description="training data: .csv (mr,ref), .jsonl or hub dataset; "
                             "None: synthetic E2E-style")
    eval_data: DataSource = Field(None, description="held-out data; None: held-out MRs of --data")
    train_samples: int | None = Field(None, ge=1, description="use at most this many training examples; None: all")
    eval_samples: int = Field(64, ge=1, description="held-out examples for the held-out loss")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="AdamW learning rate; None: sflllm train's")
    act_bits: Literal[32, 16, 8] | None = Field(
        None, description="bits per value at the cut, both directions: 32 | 16 | 8; None: the scenario's "
        "model.act_bits, or where the scenario does not set it the bits of --dtype")
    device: _train_field("device")  # type: ignore[valid-type]
    dtype: _train_field("dtype")  # type: ignore[valid-type]


def cut_bits(options: TrainingInputs, scenario: Scenario) -> int:
    """q_act of the run (spec §2): ``--act-bits``; else the scenario's ``model.act_bits`` where the scenario
    sets it; else what a cut tensor of ``--dtype`` costs (32 for float32, 16 for bfloat16 and float16)."""
    if options.act_bits is not None:
        return options.act_bits
    if "act_bits" in scenario.model.model_fields_set:
        return scenario.model.act_bits
    return activation_bits(options.dtype)


class RunOptions(TrainingInputs):
    """What ``sflllm run`` was asked to do (saved as ``DIR/run.yaml``; ``--resume`` reads it back)."""

    calibration: tuple[str, ...] = Field(
        (), description="an `sflllm calibrate` output folder: use its measured E(r) and target loss. Repeat it with "
        "folders calibrated at other --act-bits (same --target-loss) and the search also chooses the precision")
    fading: Literal["static", "block"] = Field(
        "static", description="static | block (redraw small-scale fading and re-solve the allocation every round)")
    rounds: int | None = Field(
        None, ge=1, description="rounds to train each (l, r); None: the largest E(r) among the methods' ranks")
    target_loss: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="held-out loss to reach; None: the calibration's, else the "
        "highest final loss of the trained pairs")


class CalibrateOptions(TrainingInputs):
    """What ``sflllm calibrate`` was asked to do (saved as ``DIR/calibrate.yaml`` for ``--resume``)."""

    split_layer: int | None = Field(None, ge=1, description="split layer of the calibration runs; None: the middle "
                                    "block floor(L/2)")
    max_rounds: int = Field(20, ge=1, description="rounds to train each rank")
    target_loss: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="held-out loss that defines E(r); None: best final loss over "
        "the ranks + 5% of the drop")
