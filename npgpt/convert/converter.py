"""Convert a published GPT-2 (Hugging Face folder or OpenAI TF checkpoint) to an npgpt one.

    source folder --read_source--> (npgpt-named params, GPTConfig, tokenizer files)
                  --convert------> out/model.safetensors + the tokenizer files, copied
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.checkpoint import CheckpointError, load_safetensors, save_checkpoint
from npgpt.config import GPTConfig
from npgpt.convert.common import ConversionError
from npgpt.convert.mapping import config_from_hf, config_from_tf_hparams, params_from_hf, params_from_tf
from npgpt.convert.tf_checkpoint import read_tf_checkpoint
from npgpt.convert.torch_pickle import read_pytorch_bin
from npgpt.model import FLOAT_DTYPES
from npgpt.tokenizer.formats import MERGES_FORMS
from npgpt.weights import WEIGHTS_FILE

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Source:
    """A published GPT-2 read into npgpt's names, not yet written anywhere."""

    config: GPTConfig
    params: dict[str, np.ndarray]  # npgpt names, the source's dtype
    tokenizer_files: list[Path]


def detect_format(directory: Path) -> str:
    """"openai-tf" or "huggingface", from the files the folder holds."""
    if (directory / "hparams.json").exists() and any(directory.glob("*.index")):
        return "openai-tf"
    if (directory / "config.json").exists() and any((directory / name).exists() for name in HF_WEIGHT_FILES):
        return "huggingface"
    raise ConversionError(
        f"{directory} is neither a Hugging Face GPT-2 folder (config.json + model.safetensors or "
        "pytorch_model.bin) nor an OpenAI TF checkpoint (hparams.json, checkpoint, model.ckpt.index, "
        "model.ckpt.data-*)"
    )


def read_source(directory: str | Path) -> Source:
    """Read every tensor and the config of a published GPT-2 folder, renamed for npgpt."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory} is not a directory")
    if detect_format(directory) == "openai-tf":
        config = config_from_tf_hparams(read_json(directory / "hparams.json"))
        params = params_from_tf(read_tf_checkpoint(directory), config)
    else:
        config = config_from_hf(read_json(directory / "config.json"))
        weights_path = next(directory / name for name in HF_WEIGHT_FILES if (directory / name).exists())
        params = params_from_hf(read_hf_weights(weights_path), config)
    return Source(config, params, find_tokenizer_files(directory))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def read_hf_weights(path: Path) -> dict[str, np.ndarray]:
    """Tensors of model.safetensors / pytorch_model.bin, or of all shards an *.index.json lists."""
    if path.name.endswith(".index.json"):
        weight_map = read_json(path).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors |= read_hf_weights(path.parent / shard)
        return tensors
    if not path.exists():
        raise ConversionError(f"{path} is missing")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)[0]
        except CheckpointError as error:
            raise ConversionError(str(error)) from None
    return read_pytorch_bin(path)


def find_tokenizer_files(directory: Path) -> list[Path]:
    for names in MERGES_FORMS.values():
        if all((directory / name).exists() for name in names):
            return [directory / name for name in names]
    wanted = " or ".join(" + ".join(names) for names in MERGES_FORMS.values())
    raise ConversionError(f"{directory}: no tokenizer files ({wanted}) next to the weights")


def check_tokenizer_files(files: list[Path], config: GPTConfig):
    """The vocabulary is a JSON object of at most vocab_size token ids."""
    vocab_file = files[0]
    vocab = read_json(vocab_file)
    if not all(isinstance(i, int) for i in vocab.values()):
        raise ConversionError(f"{vocab_file}: token ids must be integers")
    if vocab and max(vocab.values()) >= config.vocab_size:
        raise ConversionError(f"{vocab_file}: token id {max(vocab.values())} does not fit the model's vocab_size {config.vocab_size}")


def convert(source_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert the published GPT-2 in `source_dir` into `out_dir` (model.safetensors + the
    tokenizer files under their original names). Returns the checkpoint's path."""
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(source_dir).resolve():
        raise ConversionError(f"the output folder {out_dir} is the source folder; choose another")
    source = read_source(source_dir)
    check_tokenizer_files(source.tokenizer_files, source.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {name: np.asarray(array, dtype=dtype) for name, array in source.params.items()}
    path = out_dir / WEIGHTS_FILE
    save_checkpoint(path, params, source.config)
    for file in source.tokenizer_files:
        shutil.copyfile(file, out_dir / file.name)
    return path
