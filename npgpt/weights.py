"""Finding a model by name or path, and loading it with its tokenizer (checked to agree).

    file = resolve_weights("shakespeare")        # weights/shakespeare/model.safetensors
    model, tokenizer = load_model("shakespeare") # GPT on a backend + its tokenizer

A model folder holds WEIGHTS_FILE (an npgpt checkpoint, see `npgpt.checkpoint`) and the
tokenizer's files (see `npgpt.tokenizer.formats`). generate, train, eval and the
converters find and load models only through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from npgpt.checkpoint import read_checkpoint
from npgpt.config import GPTConfig
from npgpt.errors import UserError
from npgpt.model import GPT, check_params
from npgpt.tokenizer.formats import load as load_tokenizer

WEIGHTS_FILE = "model.safetensors"
DEFAULT_WEIGHTS = "shakespeare"
REPO_ROOT = Path(__file__).resolve().parent.parent
GPT2_HINT = (
    "to use GPT-2's published weights, convert them first, e.g. "
    "`python tools/convert_gpt2.py --from-hub gpt2 --name gpt2` (writes weights/gpt2/), then pass "
    "--weights gpt2"
)
DEFAULT_HINT = f"to use the shipped default model, leave out --weights (weights/{DEFAULT_WEIGHTS}/ of an npgpt checkout)"


class WeightsError(UserError, FileNotFoundError):
    """Weights or their tokenizer cannot be found or do not belong together; the message
    says where it looked and what to do."""


def resolve_weights(spec: str | Path | None = None) -> Path:
    """The .safetensors file that `--weights spec` means.

    spec: a folder holding model.safetensors (and the tokenizer), a .safetensors file (the
    tokenizer is read from its folder), or a NAME meaning weights/NAME/, looked for in the
    current folder and then in the npgpt checkout. None means the shipped default.
    """
    spec = str(spec or DEFAULT_WEIGHTS)
    path = Path(spec).expanduser()
    is_name = not path.exists() and len(path.parts) == 1 and path.suffix != ".safetensors"
    candidates = list(dict.fromkeys([Path.cwd() / "weights" / spec, REPO_ROOT / "weights" / spec])) if is_name else [path]
    for candidate in candidates:
        file = candidate / WEIGHTS_FILE if candidate.is_dir() else candidate
        if file.is_file():
            return file
    looked = ", ".join(str(c / WEIGHTS_FILE if is_name or c.is_dir() else c) for c in candidates)
    if spec == DEFAULT_WEIGHTS:
        raise WeightsError(
            f"the shipped default model is missing (looked for {looked}); it comes with a clone of "
            f"the npgpt repository (the README says how to retrain it), or {GPT2_HINT}"
        )
    raise WeightsError(f"no weights for {spec!r} (looked for {looked}); {GPT2_HINT}, or {DEFAULT_HINT}")


def load_tokenizer_beside(file: Path):
    """The tokenizer in the folder of a weights file."""
    try:
        return load_tokenizer(file.parent)
    except FileNotFoundError as e:
        if isinstance(e, UserError):
            raise
        raise WeightsError(f"{file} has no tokenizer beside it ({e}); {GPT2_HINT}") from None


def load_host_params(file: Path, copy: bool = False) -> tuple[dict[str, np.ndarray], GPTConfig, dict[str, str]]:
    """(params, config, header metadata) of a checkpoint, its tensors checked against the
    config: read-only memory-mapped arrays, or writable copies with copy=True (training)."""
    params, config, metadata = read_checkpoint(file)
    try:
        check_params(params, config)
    except ValueError as e:
        raise WeightsError(f"{file}: {e}; the file is damaged or was not written by npgpt") from None
    return ({k: np.array(v) for k, v in params.items()} if copy else params), config, metadata


def check_vocabularies(params: dict[str, np.ndarray], config: GPTConfig, tokenizer, where, say: Callable[[str], None] | None = None):
    """Refuse a tokenizer that does not belong to the model.

    The tokenizer may not have more ids than the model's vocab_size V. It may have fewer
    only when the model's extra rows of wte are all zero (padding, never trained); those
    ids are then never sampled (`generate` samples among the tokenizer's ids only)."""
    n, V = tokenizer.n_vocab, config.vocab_size
    if n > V:
        raise WeightsError(
            f"the tokenizer in {where} has {n} tokens but the model's vocabulary only {V}: they do not belong "
            "together; put the model's own tokenizer files beside it"
        )
    if n < V:
        extra = np.asarray(params["wte.weight"][n:])
        if np.any(extra != 0):
            raise WeightsError(
                f"the model in {where} has {V} token rows but its tokenizer only {n}, and rows {n}..{V - 1} are trained, "
                "not padding: they do not belong together; put the model's own tokenizer files beside it"
            )
        if say is not None:
            say(f"notice: the model's vocabulary has {V - n} padding rows past the tokenizer's {n} ids; they are never sampled")


def load_model(weights: str | Path | None = None, backend="numpy", dtype: str | None = None, say: Callable[[str], None] | None = None):
    """(GPT, Tokenizer) from `weights` (see `resolve_weights`) on `backend`, refused with a
    WeightsError when they do not agree (see `check_vocabularies`)."""
    file = resolve_weights(weights)
    tokenizer = load_tokenizer_beside(file)
    params, config, _ = load_host_params(file)
    check_vocabularies(params, config, tokenizer, file.parent, say)
    return GPT.from_numpy(config, params, backend, dtype), tokenizer
