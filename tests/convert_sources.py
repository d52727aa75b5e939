"""Published-style GPT-2 folders built on the fly for the converter tests (no downloads).

`transformers` builds a GPT2LMHeadModel from a config, with random weights drawn here. The
folder gets config.json, the weights (safetensors via save_pretrained, or a torch.save'd
pytorch_model.bin as transformers 4.x wrote with safe_serialization=False; transformers 5
always writes safetensors) and tokenizer files: a 256-token byte-level vocabulary unless
GPT-2's real files are passed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from npgpt.config import GPTConfig
from npgpt.model import param_shapes

from npgpt.tokenizer.formats import bytes_to_unicode

TINY = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LAYERNORM_GAINS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")


def build_hf_model(seed: int = 0, **config):
    """A GPT2LMHeadModel (float32, eval) of the given GPT2Config fields with random weights.

    The weights are drawn here with NumPy -- every weight and bias N(0, 0.02), LayerNorm
    gains 1 + N(0, 0.02), non-zero everywhere so that a wrong mapping shows -- and loaded
    with from_pretrained, which skips transformers' (slow, at 124M) initialisation."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(**{**TINY, **config})
    C, L = hf_config.n_embd, hf_config.n_layer
    gpt = GPTConfig(vocab_size=hf_config.vocab_size, n_ctx=hf_config.n_positions, n_embd=C, n_head=hf_config.n_head, n_layer=L)
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in param_shapes(gpt).items():
        value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        state[f"transformer.{name}"] = value + 1 if name.endswith(LAYERNORM_GAINS) else value
    with tempfile.TemporaryDirectory() as folder:
        hf_config.save_pretrained(folder)
        save_file(state, f"{folder}/model.safetensors", metadata={"format": "pt"})
        return GPT2LMHeadModel.from_pretrained(folder).float().eval()


def save_hf_folder(model, folder: Path, fmt: str = "safetensors", dtype: str = "float32", gpt2_vocab: Path | None = None) -> Path:
    """Write `model` as a Hugging Face folder: fmt "safetensors" or "bin"; dtype float32/float16."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, dtype))
    if fmt == "safetensors":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    model.float()
    write_tokenizer(folder, gpt2_vocab)
    return folder


def write_tokenizer(folder: Path, gpt2_vocab: Path | None = None):
    """vocab.json + merges.txt: GPT-2's (from encoder.json/vocab.bpe in `gpt2_vocab`) or 256 bytes."""
    if gpt2_vocab is not None:
        shutil.copyfile(gpt2_vocab / "encoder.json", folder / "vocab.json")
        shutil.copyfile(gpt2_vocab / "vocab.bpe", folder / "merges.txt")
        return
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def hf_logits_fn(model):
    """ids -> (T, V) float32 logits of a transformers model."""
    import torch

    def logits(ids):
        with torch.no_grad():
            return model(torch.tensor([list(ids)])).logits[0].float().numpy()

    return logits


def npgpt_logits_fn(model):
    return lambda ids: model.backend.to_numpy(model.forward(np.asarray([list(ids)])))[0]


def random_prompts(vocab_size: int, lengths=(3, 17), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


def load_cli():
    """tools/convert_gpt2.py as a module (tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "convert_gpt2.py"
    spec = importlib.util.spec_from_file_location("convert_gpt2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
