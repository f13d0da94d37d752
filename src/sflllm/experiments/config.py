"""The resolved configuration of one training run (``TrainConfig``) and its YAML 1.2 file.

A run's configuration comes from, in increasing priority: the defaults below, a YAML file
(``--config``), and command-line flags. The resolved config is written to ``DIR/config.yaml``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from sflllm.files import MAX_ECHO_CHARS, FileInputError, check_data_source, echo, load_yaml, yaml_engine


class TrainInputError(ValueError):
    """Bad user input (config, model, data, partition, checkpoint): reported in one line, exit code 2."""


DataSource = Annotated[str | None, AfterValidator(check_data_source)]
"""A data option: a local .csv/.jsonl file (checked to exist when the options are read) or a hub dataset name."""


class TrainConfig(BaseModel):
    """Everything that defines a training run. ``model=None`` / ``data=None`` select the offline demo.

    Field names use the paper's vocabulary: ``clients`` (K), ``split_layer`` (l), ``rank`` (r),
    ``local_steps`` (I), ``batch_size`` (b, per client), ``seq_len`` (s).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what to train on
    model: str | None = Field(None, description="HF model name or local dir; None: built-in tiny demo model")
    data: DataSource = Field(
        None, description="training data: .csv (mr,ref), .jsonl or hub dataset; None: synthetic E2E-style data"
    )
    eval_data: DataSource = Field(None, description="held-out data; None: held-out MRs of the training data")
    train_samples: int | None = Field(None, ge=1, description="use at most this many training examples; None: all")

    # the protocol (spec section 1)
    mode: Literal["sfl", "centralized", "fl", "sl"] = Field("sfl", description="one of sfl, centralized, fl, sl")
    clients: int = Field(3, ge=1, description="number of clients K")
    split_layer: int = Field(1, ge=1, description="blocks 1..split_layer run on the clients")
    rank: int = Field(4, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_targets: list[str] | None = Field(
        None, min_length=1, description="comma-separated LoRA target modules; None: the model type's default"
    )
    server_adapter: Literal["shared", "per_client"] = Field("shared", description="one of shared, per_client")
    act_bits: Literal[32, 16, 8] = Field(
        32, description="bits per value at the cut, both directions: 32, 16 (bfloat16) or 8 (int8 per token)"
    )
    local_steps: int = Field(6, ge=1, description="local iterations I per round")
    rounds: int = Field(6, ge=1, description="training rounds (with --resume: the new total)")
    batch_size: int = Field(8, ge=1, description="mini-batch size b per client")
    seq_len: int | Literal["auto"] = Field(
        "auto", description="sequence length s in tokens; auto: the longest tokenised training example, "
        "at most the model's position limit"
    )
    lr: float = Field(
        1e-2, gt=0, allow_inf_nan=False,
        description="AdamW learning rate (suits the offline demo; pass a smaller one for pretrained models); "
        "may change on --resume",
    )
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay")
    seed: int = Field(0, ge=0, description="seed of everything")

    # how the training pool is split across clients
    partition: Literal["iid", "dirichlet"] = Field("iid", description="one of iid, dirichlet")
    dirichlet_alpha: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (smaller: more skew)"
    )
    partition_attribute: str = Field("eatType", description="MR slot the Dirichlet partition skews on")
    keep_mr_together: bool = Field(
        True, description="keep all references of one MR on one client, or split them",
        json_schema_extra={"flag": "--keep-mr-together/--split-mrs"},
    )

    # evaluation
    eval_samples: int = Field(64, ge=1, description="held-out examples for the held-out loss")
    generate: bool = Field(False, description="also generate from held-out MRs and score BLEU/NIST/METEOR/ROUGE-L/CIDEr")
    generate_samples: int = Field(16, ge=1, description="distinct held-out MRs to generate for")
    # decoding: greedy is the quick default; LoRA's E2E setup is num_beams 10, length_penalty 0.8, no_repeat_ngram_size 4
    num_beams: int = Field(1, ge=1, description="beams for generation; 1: greedy (LoRA's E2E setup: 10)")
    length_penalty: float = Field(
        1.0, description="beam search: scores divided by length**length_penalty (LoRA's E2E setup: 0.8)"
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="never repeat an n-gram of this size; 0: off (LoRA's E2E setup: 4)"
    )
    max_new_tokens: int = Field(40, ge=1, description="longest generation in tokens")

    # execution only (results do not depend on it)
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; None: 1 for narrow models (hidden size <= 256), torch's default otherwise"
    )
    engine: Literal["local", "flower-sim", "dataplane", "flower-deployment"] = Field(
        "local", description="local: one process; flower-sim: Flower's Simulation Engine; dataplane: every cut "
        "exchange over gRPC with TLS and a token on 127.0.0.1; flower-deployment: SuperLink and SuperNodes as "
        "processes, set by `flwr run` (docs/deployment.md) (all but local: mode sfl, the flower extra)"
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
        "state stay float32; float16 trains with a dynamic loss scale (GradScaler's semantics)",
    )

    @field_validator("seq_len", mode="wrap")
    @classmethod
    def _seq_len_or_auto(cls, value: Any, handler: Any) -> int | str:
        try:
            checked = handler(value)
        except ValidationError:
            checked = None
        if checked != "auto" and (not isinstance(checked, int) or checked < 4):
            raise ValueError(f"expected an integer >= 4 or 'auto', got {echo(value)}")
        return checked

    @field_validator("server_adapter", "engine")
    @classmethod
    def _sfl_only_values_need_sfl(cls, value: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode", "sfl")
        if value in SFL_ONLY[info.field_name] and mode != "sfl":
            raise ValueError(f"{value!r} applies to mode 'sfl' only, not {mode!r}")
        return value

    @field_validator("length_penalty")
    @classmethod
    def _length_penalty_needs_beams(cls, value: float, info: ValidationInfo) -> float:
        beams = info.data.get("num_beams")  # None: num_beams itself is invalid and reported
        if value != 1.0 and beams == 1:
            raise ValueError(f"applies to beam search only: set num_beams > 1 (got num_beams {beams}) or leave it at 1.0")
        return value

    @property
    def is_demo(self) -> bool:
        """True when the built-in model or the synthetic data stands in for a real one."""
        return self.model is None or self.data is None


# Values of a field that only mode sfl supports
SFL_ONLY = {"server_adapter": ("per_client",), "engine": ("flower-sim", "dataplane", "flower-deployment")}

# Fields that may differ between a run and its ``--resume``: they do not change the trajectory of
# adapters, optimizer states or per-round metrics, only how far it goes and the final generation.
RESUMABLE_FIELDS = frozenset(
    {"rounds", "generate", "generate_samples", "num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens",
     "threads", "engine", "device", "client_batching", "server_chunk"}
)
# ``client_batching`` and ``server_chunk`` change results by float rounding only (tested); ``device`` may
# change so that a run saved on a GPU resumes on a CPU and the reverse (checkpoints are device-neutral).

# Fields that change the trajectory but may still change on ``--resume``, deliberately: a run that
# diverged continues from its last good checkpoint with a lower ``lr``. The resumed run is then no
# longer the uninterrupted one; ``metrics.json`` records each round's lr.
RESUME_OVERRIDES = RESUMABLE_FIELDS | {"lr"}


def _yaml():
    """The dumper of config.yaml (loading goes through :func:`sflllm.files.load_yaml`)."""
    yaml = yaml_engine()
    yaml.default_flow_style = False
    return yaml


def describe_validation_error(err: ValidationError) -> str:
    """One line naming every bad field: ``rank: Input should be greater than or equal to 1 (got 0)``."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p)[:MAX_ECHO_CHARS] for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            msg, got = "unknown field", ""
        elif e["type"] == "value_error":  # our own validators: the message says it all
            msg, got = str(e["ctx"]["error"]), ""
        else:
            msg, got = e["msg"], f" (got {echo(e['input'])})"
        parts.append(f"{field}: {msg}{got}")
    return "; ".join(parts)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML 1.2 config file (not yet validated). Raises TrainInputError naming the file."""
    try:
        data = load_yaml(path, "config file")
    except FileInputError as e:
        raise TrainInputError(str(e)) from None
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
