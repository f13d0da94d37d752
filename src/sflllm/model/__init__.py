"""Split Hugging Face causal LMs, attach LoRA (peft), the offline demo model and the LM loss."""

from sflllm.model.families import FAMILIES, default_lora_targets
from sflllm.model.load import build_demo_model, load_pretrained, max_positions
from sflllm.model.lora import attach_lora, lora_parameters, smallest_target_dimension
from sflllm.model.loss import IGNORE_INDEX, lm_loss, lm_loss_groups, lm_loss_rows, lm_loss_sum
from sflllm.model.placement import DTYPES, model_device, resolve_device, resolve_dtype
from sflllm.model.split import SplitModel, split_model

__all__ = [
    "DTYPES",
    "FAMILIES",
    "IGNORE_INDEX",
    "SplitModel",
    "attach_lora",
    "build_demo_model",
    "default_lora_targets",
    "lm_loss",
    "lm_loss_groups",
    "lm_loss_rows",
    "lm_loss_sum",
    "load_pretrained",
    "lora_parameters",
    "max_positions",
    "model_device",
    "resolve_device",
    "resolve_dtype",
    "smallest_target_dimension",
    "split_model",
]
