"""Where models come from: a pretrained checkpoint (local directory or hub id) or the offline demo model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sflllm.model.families import family


def _looks_like_path(name_or_path: str) -> bool:
    """True for strings that can only mean a filesystem path (hub ids are ``name`` or ``org/name``)."""
    return (
        Path(name_or_path).expanduser().is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


@contextmanager
def hub_warnings_silenced() -> Iterator[None]:
    """Hide huggingface_hub's own warnings (e.g. a line per failed HTTP attempt when offline): a
    failure reaches the caller once, as an exception."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_pretrained(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM of a supported family and its tokenizer, in float32 and eval mode.

    ``name_or_path`` is a local directory or a hub id (``AutoModelForCausalLM``/``AutoTokenizer``).
    A missing directory, an id the hub cannot serve (or offline mode) -> ValueError naming the model;
    an unsupported ``model_type`` -> ValueError listing the supported families. A tokenizer without
    a pad token gets its eos token as pad token (and the model config its id).
    """
    if not name_or_path.strip():
        raise ValueError("model name or path is empty")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        source = str(local)
    elif _looks_like_path(name_or_path) or local.exists():
        raise ValueError(f"model {name_or_path!r}: not an existing model directory")  # a path, not a hub id
    else:
        source = name_or_path  # a hub id
    with hub_warnings_silenced():
        return _load_source(name_or_path, source)


def _load_source(name_or_path: str, source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        where = (
            "this directory holds no readable model config.json"
            if Path(source).is_dir()
            else "not a local model directory and cannot be loaded from the hub"
        )
        raise ValueError(f"model {name_or_path!r}: {where} ({' '.join(str(err).split())})") from err
    try:
        family(config.model_type)
    except ValueError as err:
        raise ValueError(f"model {name_or_path!r}: {err}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {name_or_path!r}: cannot load weights or tokenizer ({err})") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name_or_path!r}: tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def build_demo_model(
    vocab_size: int,
    seed: int,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    max_positions: int = 128,
    dropout: float = 0.0,
    init_std: float = 0.1,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GPT2LMHeadModel:
    """A tiny randomly initialised GPT-2 (default 4 blocks, d=128, 4 heads, 128 positions), offline.

    The weights depend only on the arguments (initialised from ``seed``; the global RNG is left
    untouched). Returned in eval mode, like :func:`load_pretrained`.

    ``init_std`` (GPT-2's ``initializer_range``) defaults to 0.1 rather than GPT-2's 0.02: the base is
    frozen and random, so only LoRA learns, and larger random features give it more to work with. In a
    60-step LoRA-only run (rank 4, lr 1e-2, batch 8) on the synthetic E2E data, held-out loss fell
    5.49 -> 3.12 with 0.1 but only 5.10 -> 4.49 with 0.02 (3.56 with 0.05, 4.14 with 0.2).
    """
    sizes = {"vocab_size": vocab_size, "num_layers": num_layers, "hidden_size": hidden_size,
             "num_heads": num_heads, "max_positions": max_positions}
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not init_std > 0:
        raise ValueError(f"init_std must be positive, got {init_std!r}")
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for field, token_id in special.items():
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"{field} must be in 0..{vocab_size - 1}, got {token_id!r}")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_positions,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        initializer_range=init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def max_positions(model: PreTrainedModel) -> int | None:
    """How many token positions the model supports (``max_position_embeddings``, GPT-2's ``n_positions``),
    or None when its config does not say."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
