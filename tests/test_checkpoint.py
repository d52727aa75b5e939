"""safetensors checkpoints: round trips, interop with the official `safetensors` package in
both directions, and clear errors for damaged or hostile files."""

import json

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npgpt.checkpoint import CheckpointError, load_checkpoint, load_safetensors, save_checkpoint, save_safetensors
from npgpt.config import GPTConfig
from npgpt.model import GPT

TINY = GPTConfig(vocab_size=31, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]

tensors_strategy = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(lambda k: k != "__metadata__"),
    st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))),
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(tensors=tensors_strategy)
def test_round_trip_and_official_reader(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_safetensors(path, tensors, {"note": "ünïcode"})
    ours, metadata = load_safetensors(path)
    official = safetensors.numpy.load_file(path)
    assert metadata == {"note": "ünïcode"} and set(ours) == set(tensors) == set(official)
    for name, array in tensors.items():
        for got in (ours[name], official[name]):
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)


@settings(max_examples=40, deadline=None)
@given(tensors=tensors_strategy)
def test_reads_what_the_official_writer_wrote(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"k": "v"})
    ours, metadata = load_safetensors(path)
    assert metadata == {"k": "v"}
    for name, array in tensors.items():
        np.testing.assert_array_equal(ours[name], array)
        assert ours[name].dtype == array.dtype


def test_arrays_are_memory_mapped_and_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    tensors, _ = load_safetensors(path)
    assert not tensors["w"].flags.owndata and not tensors["w"].flags.writeable
    with pytest.raises(ValueError):
        tensors["w"][0, 0] = 1.0


def test_model_checkpoint_round_trip_keeps_config_and_logits(tmp_path):
    model = GPT.init(TINY, seed=3)
    model.save(tmp_path / "model.safetensors")
    loaded = GPT.load(tmp_path / "model.safetensors")
    assert loaded.config == TINY
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(loaded.forward(ids), model.forward(ids))
    as16 = GPT.load(tmp_path / "model.safetensors", dtype="float16")
    assert as16.dtype == np.float16


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.safetensors"
    save_safetensors(path, {"a": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="complex64"):
        save_safetensors(path, {"a": np.zeros(3, np.float32), "bad": np.zeros(2, np.complex64)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    np.testing.assert_array_equal(load_safetensors(path)[0]["a"], np.ones(3, np.float32))


def write_raw(path, header: dict, data: bytes, header_len=None):
    blob = json.dumps(header).encode()
    path.write_bytes((header_len or len(blob)).to_bytes(8, "little") + blob + data)
    return path


@pytest.mark.parametrize(
    "header, data, header_len, message",
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "truncated or corrupt"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"", 10**9, "impossible"),
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "malformed entry"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "negative"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, "overlap or hole",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "data section has 8"),
        ({"__metadata__": {"a": 1}}, b"", None, "strings to strings"),
    ],
)  # fmt: skip
def test_damaged_files_are_clear_errors(tmp_path, header, data, header_len, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=message):
        load_safetensors(path)


def test_not_json_and_too_short(tmp_path):
    (tmp_path / "a").write_bytes(b"\x03\0\0\0\0\0\0\0{x}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_safetensors(tmp_path / "a")
    (tmp_path / "b").write_bytes(b"\x03\0")
    with pytest.raises(CheckpointError, match="too short"):
        load_safetensors(tmp_path / "b")


def test_plain_safetensors_is_not_an_npgpt_checkpoint(tmp_path):
    save_safetensors(tmp_path / "x.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="convert_gpt2.py"):
        load_checkpoint(tmp_path / "x.safetensors")
    save_checkpoint(tmp_path / "y.safetensors", {"w": np.ones(2, np.float32)}, TINY)
    assert load_checkpoint(tmp_path / "y.safetensors")[1] == TINY


def test_bfloat16_is_widened_to_float32(tmp_path):
    """Files written in bfloat16 (common on the hub) load as the exact float32 values."""
    import torch
    from safetensors.torch import save_file

    values = torch.tensor([1.0, -2.5, 3.140625, 1e-3], dtype=torch.bfloat16)
    save_file({"w": values}, tmp_path / "b.safetensors")
    loaded = load_safetensors(tmp_path / "b.safetensors")[0]["w"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values.float().numpy())
