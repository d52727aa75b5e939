#!/usr/bin/env python
"""Convert published GPT-2 weights into an npgpt checkpoint, and check parity with transformers.

    python tools/convert_gpt2.py path/to/hf-or-tf-folder --name gpt2     # -> weights/gpt2/
    python tools/convert_gpt2.py --from-hub gpt2 --check                 # download, convert, compare

Sources: a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin,
vocab.json + merges.txt; gpt2, -medium, -large, -xl, distilgpt2; float32/float16/bfloat16)
or OpenAI's TensorFlow checkpoint folder (hparams.json, checkpoint, model.ckpt.*, encoder.json,
vocab.bpe). Neither torch nor TensorFlow is needed to convert; --check needs transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from npgpt.convert import convert, fetch_from_hub, read_source  # noqa: E402
from npgpt.convert.converter import detect_format  # noqa: E402
from npgpt.convert.parity import PROMPTS, compare, format_report  # noqa: E402
from npgpt.errors import UserError, add_debug_flag, run_cli  # noqa: E402
from npgpt.model import FLOAT_DTYPES  # noqa: E402
from npgpt.weights import WEIGHTS_FILE  # noqa: E402
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="folder with the published weights (or use --from-hub)")
    parser.add_argument("--from-hub", metavar="REPO", help="Hugging Face hub repository id, e.g. gpt2, gpt2-medium, distilgpt2")
    parser.add_argument("--revision", default="main", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--hub-url", help="hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--cache-dir", help="download cache (default: $NPGPT_CACHE/hub or ~/.cache/npgpt/hub)")
    parser.add_argument("--name", help="output name: writes <out-root>/<name>/ (default: the source folder's or repo's name)")
    parser.add_argument("--out-root", default="weights", help="parent folder of the output (default: weights)")
    parser.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES, help="stored dtype (default: float32)")
    parser.add_argument("--check", action="store_true", help="compare against transformers on fixed prompts (float32 on both sides)")
    parser.add_argument("--n-new", type=int, default=32, help="greedy tokens generated per prompt by --check (default: 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.source is None) == (args.from_hub is None):
        parser.error("give either a source folder or --from-hub REPO (not both)")
    return args


def hf_logits_fn(source_dir: Path, source_format: str):
    """transformers' GPT2LMHeadModel on the source, float32, as ids -> (T, V) logits.
    A TF checkpoint is loaded through npgpt's reader (transformers would need TensorFlow)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if source_format == "huggingface":
        model = GPT2LMHeadModel.from_pretrained(source_dir).float()  # fp16 sources upcast exactly
    else:
        source = read_source(source_dir)
        c = source.config
        config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon)
        model = GPT2LMHeadModel(config)
        state = {f"transformer.{k}": torch.from_numpy(np.asarray(v, np.float32)) for k, v in source.params.items()}
        model.load_state_dict(state, strict=False)
    model.eval()

    def logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    return logits


def run_check(source_dir: Path, out_dir: Path, checkpoint: Path, n_new: int) -> bool:
    """Print the parity report; True when every greedy continuation is identical."""
    from npgpt.model import GPT

    try:
        reference = hf_logits_fn(source_dir, detect_format(source_dir))
    except ImportError as error:
        print(f"--check needs transformers and torch ({error})", file=sys.stderr)
        return False
    model = GPT.load(checkpoint, dtype="float32")
    tokenizer = load_tokenizer(out_dir)
    prompts = [tokenizer.encode(text)[-(model.config.n_ctx - n_new) :] for text in PROMPTS]  # fit n_ctx
    candidate = lambda ids: model.backend.to_numpy(model.forward(np.asarray([ids])))[0]  # noqa: E731
    reports = compare(reference, candidate, prompts, n_new)
    print(format_report(reports, decode=tokenizer.decode))
    return all(r.greedy_identical for r in reports)


def main(argv=None) -> int:
    return run_cli(_main, sys.argv[1:] if argv is None else argv)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.from_hub:
        source_dir = fetch_from_hub(args.from_hub, args.cache_dir, args.hub_url, args.revision)
        print(f"hub files in {source_dir}", file=sys.stderr)
    else:
        source_dir = Path(args.source)
    name = args.name or (args.from_hub.split("/")[-1] if args.from_hub else source_dir.resolve().name)
    out_dir = Path(args.out_root) / name
    if (out_dir / WEIGHTS_FILE).exists() and not args.overwrite:
        raise UserError(f"{out_dir} already holds a model; choose another --name or --out-root, or pass --overwrite to replace it")
    checkpoint = convert(source_dir, out_dir, args.dtype)
    print(f"wrote {checkpoint} and the tokenizer files in {out_dir}")
    if args.check:
        return 0 if run_check(source_dir, out_dir, checkpoint, args.n_new) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
