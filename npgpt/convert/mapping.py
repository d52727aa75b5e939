"""Published GPT-2 names -> npgpt names, in one table, and the configs of published models.

npgpt keeps Hugging Face's names (without "transformer.") and HF's Conv1D layout (in, out),
applied as x @ W + b -- which is also OpenAI's layout, so no weight is transposed. OpenAI's
TensorFlow checkpoint stores each `w` as a 1x1 convolution kernel [1, in, out]: the leading
1 is dropped. Everything else is a rename.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from npgpt.config import GPTConfig
from npgpt.convert.common import ConversionError
from npgpt.model import param_shapes


class Row(NamedTuple):
    npgpt: str  # "{i}" = layer index
    hugging_face: str  # also accepted with a "transformer." prefix
    openai_tf: str
    tf_kernel: bool  # TF stores [1, in, out]; drop the leading 1


# fmt: off
NAME_TABLE = [
    #   npgpt                        Hugging Face                 OpenAI TensorFlow          TF [1,in,out]
    Row("wte.weight",                "wte.weight",                "model/wte",               False),
    Row("wpe.weight",                "wpe.weight",                "model/wpe",               False),
    Row("h.{i}.ln_1.weight",         "h.{i}.ln_1.weight",         "model/h{i}/ln_1/g",       False),
    Row("h.{i}.ln_1.bias",           "h.{i}.ln_1.bias",           "model/h{i}/ln_1/b",       False),
    Row("h.{i}.attn.c_attn.weight",  "h.{i}.attn.c_attn.weight",  "model/h{i}/attn/c_attn/w", True),
    Row("h.{i}.attn.c_attn.bias",    "h.{i}.attn.c_attn.bias",    "model/h{i}/attn/c_attn/b", False),
    Row("h.{i}.attn.c_proj.weight",  "h.{i}.attn.c_proj.weight",  "model/h{i}/attn/c_proj/w", True),
    Row("h.{i}.attn.c_proj.bias",    "h.{i}.attn.c_proj.bias",    "model/h{i}/attn/c_proj/b", False),
    Row("h.{i}.ln_2.weight",         "h.{i}.ln_2.weight",         "model/h{i}/ln_2/g",       False),
    Row("h.{i}.ln_2.bias",           "h.{i}.ln_2.bias",           "model/h{i}/ln_2/b",       False),
    Row("h.{i}.mlp.c_fc.weight",     "h.{i}.mlp.c_fc.weight",     "model/h{i}/mlp/c_fc/w",   True),
    Row("h.{i}.mlp.c_fc.bias",       "h.{i}.mlp.c_fc.bias",       "model/h{i}/mlp/c_fc/b",   False),
    Row("h.{i}.mlp.c_proj.weight",   "h.{i}.mlp.c_proj.weight",   "model/h{i}/mlp/c_proj/w", True),
    Row("h.{i}.mlp.c_proj.bias",     "h.{i}.mlp.c_proj.bias",     "model/h{i}/mlp/c_proj/b", False),
    Row("ln_f.weight",               "ln_f.weight",               "model/ln_f/g",            False),
    Row("ln_f.bias",                 "ln_f.bias",                 "model/ln_f/b",            False),
]
# fmt: on

# Hugging Face tensors that are not parameters of their own:
TIED_HEAD = "lm_head.weight"  # the output projection, a copy of wte.weight (checked, dropped)
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask constants of older HF files
HF_PREFIX = "transformer."


def expand_rows(n_layer: int) -> list[Row]:
    """NAME_TABLE with "{i}" filled in, in checkpoint order: wte, wpe, block 0, block 1, ..., ln_f."""
    block = [row for row in NAME_TABLE if "{i}" in row.npgpt]
    rows = []
    for row in NAME_TABLE:
        if "{i}" not in row.npgpt:
            rows.append(row)
        elif row is block[0]:
            rows += [Row(*(name.format(i=i) for name in r[:3]), r.tf_kernel) for i in range(n_layer) for r in block]
    return rows


def params_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """npgpt parameters from a Hugging Face GPT-2 state dict (prefix optional, head tied)."""
    stripped = {}
    for name, array in tensors.items():
        short = name.removeprefix(HF_PREFIX)
        if short.endswith(MASK_BUFFERS):
            continue
        if short in stripped:
            raise ConversionError(f"tensor {short!r} appears both with and without the {HF_PREFIX!r} prefix")
        stripped[short] = array
    head = stripped.pop(TIED_HEAD, None)
    params = rename(stripped, config, [(row.hugging_face, row.npgpt, False) for row in expand_rows(config.n_layer)])
    if head is not None and not np.array_equal(head, stripped["wte.weight"]):
        raise ConversionError(f"{TIED_HEAD!r} differs from wte.weight: an untied output head, which GPT-2 (and npgpt) does not have")
    return params


def params_from_tf(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """npgpt parameters from OpenAI's TF checkpoint variables."""
    return rename(tensors, config, [(row.openai_tf, row.npgpt, row.tf_kernel) for row in expand_rows(config.n_layer)])


def rename(tensors: dict[str, np.ndarray], config: GPTConfig, plan: list[tuple[str, str, bool]]) -> dict[str, np.ndarray]:
    """Apply (source name, npgpt name, drop leading 1) to every tensor, checking that
    nothing is missing or left over and that every shape is the one the config implies."""
    expected_shapes = param_shapes(config)
    missing = [source for source, _, _ in plan if source not in tensors]
    if missing:
        raise ConversionError(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unknown = sorted(set(tensors) - {source for source, _, _ in plan})
    if unknown:
        raise ConversionError(f"unknown tensors (not part of GPT-2 with n_layer={config.n_layer}): {', '.join(unknown[:8])}")
    params = {}
    for source, target, kernel in plan:
        array = tensors[source]
        if kernel:
            if array.ndim != 3 or array.shape[0] != 1:
                raise ConversionError(f"tensor {source!r}: expected a [1, in, out] kernel, got shape {list(array.shape)}")
            array = array[0]
        if tuple(array.shape) != expected_shapes[target]:
            raise ConversionError(f"tensor {source!r} (-> {target}) has shape {list(array.shape)}, the config needs {list(expected_shapes[target])}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ConversionError(f"tensor {source!r} has dtype {array.dtype}, expected a float type")
        params[target] = array
    return params


def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 `config.json` (defaults as in transformers' GPT2Config);
    refuses variants npgpt does not compute (other activations, untied head, ...)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    C = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * C)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ConversionError(f"config.json: {key}={value!r} is not supported (npgpt computes GPT-2 with {key} in {allowed})")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_embd=C,
        n_head=hf.get("n_head", 12),
        n_layer=hf.get("n_layer", 12),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def config_from_tf_hparams(hparams: dict) -> GPTConfig:
    """GPTConfig from OpenAI's `hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    try:
        return GPTConfig(
            vocab_size=hparams["n_vocab"], n_ctx=hparams["n_ctx"], n_embd=hparams["n_embd"],
            n_head=hparams["n_head"], n_layer=hparams["n_layer"],
        )  # fmt: skip
    except KeyError as missing:
        raise ConversionError(f"hparams.json: missing {missing}") from None
