"""Atomic files and checked safetensors checkpoints (sflllm.experiments.checkpoint)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sflllm.files
from sflllm.experiments.checkpoint import read_safetensors, write_safetensors_atomic
from sflllm.experiments.config import TrainInputError
from sflllm.files import FileInputError, write_atomic

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
        st.tuples(st.lists(st.integers(0, 4), max_size=3), st.sampled_from(DTYPES)),
        max_size=4,
    ),
    meta=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3),
)
def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path_factory, shapes, meta):
    path = tmp_path_factory.mktemp("ckpt") / "x.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {n: (torch.rand(s, generator=gen) * 100).to(dt) for n, (s, dt) in shapes.items()}
    write_safetensors_atomic(path, tensors, meta)
    got, got_meta = read_safetensors(path)
    assert got_meta == meta
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_atomic(path, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sflllm.files.os, "fsync", broken_fsync)
    with pytest.raises(FileInputError, match=f"cannot write {path}: No space left on device"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "not_safetensors"])
def test_damaged_file_is_reported_with_its_name(tmp_path, damage):
    path = tmp_path / "state.safetensors"
    write_safetensors_atomic(path, {"a": torch.arange(6.0), "b": torch.ones(2, 3)}, {"k": "v"})
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_data_byte":
        raw[-1] ^= 0x01
    else:
        raw = bytearray(b"\x80\x04 pickle bytes are never loaded")
    path.write_bytes(bytes(raw))
    with pytest.raises(TrainInputError, match=str(path)):
        read_safetensors(path)
