"""Export an npgpt model to a Hugging Face folder: `python -m npgpt.export WEIGHTS OUT_DIR`.

transformers loads the folder with no custom code:
`GPT2LMHeadModel.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`.

    config.json              GPT2Config: the shape, GPT-2's tanh GELU, a head tied to wte
    model.safetensors        the parameters under HF's GPT-2 names, as stored (npgpt keeps HF's
                             names and Conv1D (in, out) layout, so nothing is transposed); no
                             lm_head.weight: transformers ties it to wte.weight, as in GPT-2's files
    generation_config.json   bos/eos = <|endoftext|> where the vocabulary has it, else none
    vocab.json, merges.txt   the byte-level BPE vocabulary in GPT2Tokenizer's files
    tokenizer_config.json, special_tokens_map.json

The inverse of `npgpt.convert` (tools/convert_gpt2.py reads the folder back, bit for bit).
A character-level vocabulary, or a BPE with another split pattern than GPT-2's, is refused:
GPT2Tokenizer has no form for either.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from npgpt.checkpoint import save_safetensors
from npgpt.config import GPTConfig
from npgpt.convert.mapping import expand_rows
from npgpt.errors import UserError, add_debug_flag, run_cli
from npgpt.model import dtype_name
from npgpt.tokenizer.base import ENDOFTEXT
from npgpt.tokenizer.bpe import GPT2_PATTERN, BPETokenizer
from npgpt.tokenizer.formats import write_merges_form
from npgpt.weights import WEIGHTS_FILE, check_vocabularies, load_host_params, load_tokenizer_beside, resolve_weights

HF_FILES = ("config.json", WEIGHTS_FILE, "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json")  # fmt: skip


class ExportError(UserError, ValueError):
    """A model or tokenizer that has no Hugging Face GPT-2 form; the message says why."""


def hf_config(config: GPTConfig, dtype: str, eot_id: int | None) -> dict:
    """config.json for transformers' GPT2LMHeadModel (the inverse of `mapping.config_from_hf`)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GPT-2's tanh approximation, as npgpt computes
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


def check_exportable(tokenizer) -> BPETokenizer:
    if not isinstance(tokenizer, BPETokenizer):
        raise ExportError(
            "the model's tokenizer is character-level, and Hugging Face's GPT-2 tokenizer reads only a byte-level "
            "BPE vocabulary; train the model with a BPE tokenizer (python -m npgpt.train --tokenizer bpe:N) to export it"
        )
    if tokenizer.pattern != GPT2_PATTERN:
        raise ExportError(
            "the tokenizer splits text with another pattern than GPT-2's, which Hugging Face's GPT-2 tokenizer "
            "always uses; train the tokenizer with the gpt2 pattern to export it"
        )
    try:
        tokenizer.merges()
    except ValueError as e:
        raise ExportError(f"{e}; Hugging Face's GPT-2 tokenizer needs a merges list") from None
    return tokenizer


def write_tokenizer_files(out: Path, tokenizer: BPETokenizer, n_ctx: int) -> None:
    """vocab.json + merges.txt and the two small files that make AutoTokenizer pick GPT-2's."""
    write_merges_form(out, tokenizer, "huggingface")
    eot = ENDOFTEXT if ENDOFTEXT in tokenizer.special_tokens else None
    others = sorted(t for t in tokenizer.special_tokens if t != ENDOFTEXT)
    special_map = {"bos_token": eot, "eos_token": eot, "unk_token": eot, **({"additional_special_tokens": others} if others else {})}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": n_ctx,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",  # bytes that are not UTF-8 decode to U+FFFD, as in npgpt
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", {k: v for k, v in special_map.items() if v is not None})


def export(weights: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder of the model `weights` means (see `npgpt.weights`)."""
    file = resolve_weights(weights)
    tokenizer = check_exportable(load_tokenizer_beside(file))
    params, config, _ = load_host_params(file)
    check_vocabularies(params, config, tokenizer, file.parent)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a folder to export to")
    if out.resolve() == file.parent.resolve():
        raise ExportError(f"{out} is the model's own folder; choose another folder to export to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty; choose an empty or new folder, or pass --overwrite to replace its files")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        dtype = dtype_name(params["wte.weight"].dtype)
        tensors = {row.hugging_face: np.asarray(params[row.npgpt]) for row in expand_rows(config.n_layer)}
        save_safetensors(out / WEIGHTS_FILE, tensors, {"format": "pt"})  # transformers requires "pt"
        eot = tokenizer.eot_id
        _write_json(out / "config.json", hf_config(config, dtype, eot))
        _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
        write_tokenizer_files(out, tokenizer, config.n_ctx)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m npgpt.export", description="Export an npgpt model to a Hugging Face GPT-2 folder.",
                                epilog="Load it with transformers: GPT2LMHeadModel.from_pretrained(OUT_DIR), AutoTokenizer.from_pretrained(OUT_DIR).")  # fmt: skip
    p.add_argument("weights", help="a model folder, a .safetensors file, or a NAME for weights/NAME/")
    p.add_argument("out_dir", help="folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT_DIR")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    out = export(args.weights, args.out_dir, args.overwrite)
    print(f"wrote {', '.join(HF_FILES)} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
