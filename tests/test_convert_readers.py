"""The converter's readers: CRC-32C, the TF tensor-bundle reader, the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import data_path
from npgpt.convert import ConversionError
from npgpt.convert.crc32c import crc32c, crc32c_bytes, mask
from npgpt.convert.tf_checkpoint import parse_bundle_entry, parse_message, read_tf_checkpoint, read_varint
from npgpt.convert.torch_pickle import read_pytorch_bin

torch = pytest.importorskip("torch")


# --- CRC-32C ------------------------------------------------------------------------------


def test_crc32c_known_values():
    assert crc32c_bytes(b"123456789") == crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) test vectors
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert mask(0) == 0xA282EAD8


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=6000))
def test_crc32c_chunked_equals_bytewise(data):
    assert crc32c(data) == crc32c_bytes(data)


# --- protobuf / TF reader ---------------------------------------------------------------


def test_varint_and_message_decoding():
    assert read_varint(bytes([0xAC, 0x02]), 0) == (300, 2)
    minus_one = bytes([0xFF] * 9 + [0x01])
    # BundleEntryProto: dtype 1 (float32), shape {dim {size 3} dim {size -1}}, offset 300, crc32c fixed32
    shape = b"\x12\x02\x08\x03" + b"\x12\x0b\x08" + minus_one
    entry = b"\x08\x01" + b"\x12" + bytes([len(shape)]) + shape + b"\x20\xac\x02" + b"\x35\x01\x00\x00\x80"
    assert parse_message(b"\x08\x01\x20\xac\x02") == {1: [1], 4: [300]}
    parsed = parse_bundle_entry("t", entry)
    assert parsed["dtype"] == "float32" and parsed["shape"] == (3, -1)
    assert parsed["offset"] == 300 and parsed["crc32c"] == 0x80000001 and parsed["shard_id"] == 0


def test_tf_fixture_bit_for_bit():
    folder = data_path("gpt2-tf-tiny")
    tensors = read_tf_checkpoint(folder)
    reference = np.load(folder / "reference.npz")
    assert sorted(tensors) == sorted(reference.files) and len(tensors) == 28
    for name in reference.files:
        assert tensors[name].dtype == reference[name].dtype, name
        assert tensors[name].shape == reference[name].shape, name
        assert tensors[name].tobytes() == reference[name].tobytes(), name


@pytest.fixture
def tf_copy(tmp_path):
    folder = data_path("gpt2-tf-tiny")
    for name in ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copyfile(folder / name, tmp_path / name)
    return tmp_path


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_tf_corrupt_data_names_the_tensor(tf_copy):
    flip_byte(tf_copy / "model.ckpt.data-00000-of-00001", 0)  # first tensor in name order
    with pytest.raises(ConversionError, match=r"model/h0/attn/c_attn/b.*CRC-32C"):
        read_tf_checkpoint(tf_copy)


def test_tf_truncated_data_names_the_tensor(tf_copy):
    shard = tf_copy / "model.ckpt.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-100])  # model/wte is stored last
    with pytest.raises(ConversionError, match=r"model/wte.*past the end.*truncated"):
        read_tf_checkpoint(tf_copy)


def test_tf_corrupt_or_truncated_index(tf_copy):
    index = tf_copy / "model.ckpt.index"
    original = index.read_bytes()
    flip_byte(index, 20)
    with pytest.raises(ConversionError, match="CRC-32C"):
        read_tf_checkpoint(tf_copy)
    index.write_bytes(original[:-10])
    with pytest.raises(ConversionError, match="magic|truncated"):
        read_tf_checkpoint(tf_copy)


def test_tf_missing_shard(tf_copy):
    (tf_copy / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(ConversionError, match="model.ckpt.data-00000-of-00001.*missing"):
        read_tf_checkpoint(tf_copy)


# --- pytorch_model.bin ------------------------------------------------------------------


def tricky_state_dict():
    """Shared storages, offsets, non-contiguous strides, a Parameter, several dtypes."""
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    return {
        "w": base,
        "tied": base,  # same storage twice, as lm_head / wte
        "rows": base[2:],  # storage offset
        "transposed": base.t(),  # strides (1, 5)
        "half": torch.randn(4, 3).half(),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "long": torch.arange(5),
        "param": torch.nn.Parameter(torch.randn(3)),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_bin_matches_torch(tmp_path, zip_format):
    state = tricky_state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    tensors = read_pytorch_bin(path)
    assert list(tensors) == list(state)
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        assert tensors[name].dtype == expected.dtype and tensors[name].shape == expected.shape, name
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)


class RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile_zip(path, payload):
    """A zip laid out like torch.save's, whose data.pkl is `payload`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("attack", [RunsShellCommand, WritesFile])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_hostile_pickle_runs_nothing(tmp_path, attack, container):
    marker = tmp_path / "pwned"
    # the attack hides inside an otherwise ordinary state dict
    payload = pickle.dumps({"wte.weight": attack(marker)}, protocol=2)
    path = tmp_path / "pytorch_model.bin"
    if container == "zip":
        hostile_zip(path, payload)
    else:
        path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {})) + payload)
    with pytest.raises(ConversionError, match=r"refusing to load it.*malicious") as error:
        read_pytorch_bin(path)
    assert "system" in str(error.value) or "open" in str(error.value)
    assert not marker.exists()


def test_allowed_global_misused_is_a_clear_error(tmp_path):
    # _rebuild_tensor_v2 is allowed, but here it is handed a string instead of a storage
    payload = (
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02"
        b"(X\x03\x00\x00\x00badK\x00K\x01\x85K\x01\x85\x89tRs."
    )
    path = tmp_path / "pytorch_model.bin"
    hostile_zip(path, payload)
    with pytest.raises(ConversionError, match="not a storage"):
        read_pytorch_bin(path)


def test_truncated_pytorch_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": torch.randn(50, 8)}, path)
    path.with_name("cut.bin").write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ConversionError, match="truncated|corrupt"):
        read_pytorch_bin(path.with_name("cut.bin"))
    # a well-formed archive whose storage blob is too short: the error names the tensor
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "short.bin", "w") as target:
        for item in source.namelist():
            data = source.read(item)
            target.writestr(item, data[:-8] if item.endswith("/data/0") else data)
    with pytest.raises(ConversionError, match=r"'wte.weight'.*truncated"):
        read_pytorch_bin(tmp_path / "short.bin")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(io.BytesIO(b"hello, not a pickle").read())
    with pytest.raises(ConversionError):
        read_pytorch_bin(path)
