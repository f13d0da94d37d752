"""The resolved configuration of one training run (``TrainConfig``) and its YAML 1.2 file.

A run's configuration comes from, in increasing priority: the defaults below, a YAML file
(``--config``), and command-line flags. The resolved config is written to ``DIR/config.yaml``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class TrainInputError(ValueError):
    """Bad user input (config, model, data, partition, checkpoint): reported in one line, exit code 2."""


class TrainConfig(BaseModel):
    """Everything that defines a training run. ``model=None`` / ``data=None`` select the offline demo.

    Field names use the paper's vocabulary: ``clients`` (K), ``split_layer`` (l), ``rank`` (r),
    ``local_steps`` (I), ``batch_size`` (b, per client), ``seq_len`` (s).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what to train on
    model: str | None = Field(None, description="HF hub name or local dir; None: built-in tiny demo model")
    data: str | None = Field(None, description=".csv/.jsonl file or hub dataset; None: synthetic E2E-style data")
    eval_data: str | None = Field(None, description="held-out set; None: held-out MRs of the training data")
    train_samples: int | None = Field(None, ge=1, description="use at most this many training examples")

    # the protocol (spec section 1)
    mode: Literal["sfl", "centralized", "fl", "sl"] = "sfl"
    clients: int = Field(3, ge=1)
    split_layer: int = Field(1, ge=1)
    rank: int = Field(4, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | None = Field(None, min_length=1, description="None: the model type's default")
    server_adapter: Literal["shared", "per_client"] = "shared"
    local_steps: int = Field(6, ge=1)
    rounds: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(104, ge=4)  # the longest synthetic demo example is 100 tokens
    lr: float = Field(1e-2, gt=0)  # suits the offline demo; pass a smaller --lr for pretrained models
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)

    # how the training pool is split across clients
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    partition_attribute: str = "eatType"
    keep_mr_together: bool = Field(True, description="all references of one MR go to the same client")

    # evaluation
    eval_samples: int = Field(64, ge=1, description="held-out examples for the held-out loss")
    generate: bool = Field(False, description="also generate from held-out MRs and score BLEU/ROUGE-L/NIST/...")
    generate_samples: int = Field(16, ge=1, description="distinct held-out MRs to generate for")
    num_beams: int = Field(1, ge=1)
    max_new_tokens: int = Field(40, ge=1)

    # execution only (results do not depend on it)
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; None: 1 for narrow models (hidden size <= 256), torch's default otherwise"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="auto | cpu | cuda | cuda:N | mps; auto: CUDA, then MPS, then CPU",
    )
    client_batching: Literal["auto", "sequential", "batched"] = Field(
        "auto", description="run the K client passes one by one or as one batched pass (LoRA grouped per client); "
        "auto: batched where the client part has no dropout",
    )
    server_chunk: int | None = Field(
        None, ge=1, description="main server runs the K clients' activations N clients at a time (bounds its memory); "
        "None: all K as one batch",
    )

    # numerics (part of the trajectory: a run cannot resume in another dtype)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen base weights and of the cut tensors; LoRA tensors and AdamW "
        "state stay float32",
    )

    @field_validator("server_adapter")
    @classmethod
    def _per_client_server_needs_sfl(cls, value: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode", "sfl")
        if value == "per_client" and mode != "sfl":
            raise ValueError(f"'per_client' applies to mode 'sfl' only, not {mode!r}")
        return value

    @property
    def is_demo(self) -> bool:
        """True when the built-in model or the synthetic data stands in for a real one."""
        return self.model is None or self.data is None


# Fields that may differ between a run and its ``--resume``: they do not change the trajectory of
# adapters, optimizer states or per-round metrics, only how far it goes and the final generation.
# ``client_batching`` and ``server_chunk`` change results by float rounding only (tested); ``device`` may
# change so that a run saved on a GPU resumes on a CPU and the reverse (checkpoints are device-neutral).
RESUMABLE_FIELDS = frozenset({"rounds", "generate", "generate_samples", "num_beams", "max_new_tokens", "threads",
                              "device", "client_batching", "server_chunk"})


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)  # YAML 1.2: `1e-3` is a float, `no` is a string
    yaml.default_flow_style = False
    return yaml


def describe_validation_error(err: ValidationError) -> str:
    """One line naming every bad field: ``rank: Input should be greater than or equal to 1 (got 0)``."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            msg, got = "unknown field", ""
        elif e["type"] == "value_error":  # our own validators: the message says it all
            msg, got = str(e["ctx"]["error"]), ""
        else:
            msg, got = e["msg"], f" (got {e['input']!r})"
        parts.append(f"{field}: {msg}{got}")
    return "; ".join(parts)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML 1.2 config file (not yet validated). Raises TrainInputError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TrainInputError(f"config file {path}: {e.strerror or e}") from None
    try:
        data = _yaml().load(text)
    except YAMLError as e:
        raise TrainInputError(f"config file {path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainInputError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    return dict(data)


def resolve_config(file_values: dict[str, Any], overrides: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate ``file_values`` updated by ``overrides`` (flags win). Errors name the field and ``source``."""
    try:
        return TrainConfig.model_validate({**file_values, **overrides})
    except ValidationError as e:
        raise TrainInputError(f"{source}: {describe_validation_error(e)}") from None


def config_to_yaml(config: TrainConfig) -> str:
    """The YAML text of ``config`` (every field, so the file alone reproduces the run)."""
    buf = io.StringIO()
    _yaml().dump(config.model_dump(mode="json"), buf)
    return buf.getvalue()
