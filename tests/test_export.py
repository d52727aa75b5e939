"""Export to Hugging Face: transformers loads the folder with no custom code and computes what
npgpt computes; its tokenizer gives npgpt's ids; tools/convert_gpt2.py reads it back bit for bit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, data_path
from npgpt.checkpoint import load_safetensors
from npgpt.config import GPTConfig
from npgpt.export import export
from npgpt.generate import generate_ids
from npgpt.model import GPT
from npgpt.sampling import SamplingConfig
from npgpt.tokenizer import BPETokenizer, CharTokenizer, save, train_bpe
from npgpt.weights import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def shakespeare_text():
    return data_path("corpora/tinyshakespeare.txt").read_text("utf-8")


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory, shakespeare_text):
    """A tiny model freshly trained by npgpt.train, with a BPE vocabulary that has <|endoftext|>."""
    from npgpt import train

    root = tmp_path_factory.mktemp("fresh")
    save(train_bpe(shakespeare_text[:50_000], 400, special_tokens=[EOT]), root / "tok")
    (root / "data.txt").write_text(shakespeare_text[:20_000], "utf-8")
    argv = ["--data", str(root / "data.txt"), "--out-dir", str(root / "run"), "--tokenizer", str(root / "tok"),
            "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "96", "--batch-size", "4",
            "--max-iters", "3", "--eval-iters", "1", "--log-interval", "1"]  # fmt: skip
    assert train.main(argv) == 0
    return root / "run"


@pytest.fixture(scope="module")
def finetuned_gpt2(tmp_path_factory, shakespeare_text):
    """A GPT-2 (OpenAI's layout, GPT-2's whole vocabulary, tiny shape) converted, then fine-tuned."""
    from npgpt import train
    from npgpt.convert import convert

    root = tmp_path_factory.mktemp("gpt2")
    convert(data_path("gpt2-tf-tiny"), root / "converted")
    (root / "data.txt").write_text(shakespeare_text[:5_000], "utf-8")
    argv = ["--data", str(root / "data.txt"), "--out-dir", str(root / "run"), "--init-from", str(root / "converted"),
            "--block-size", "32", "--batch-size", "2", "--max-iters", "2", "--eval-iters", "1", "--lr", "1e-2"]  # fmt: skip
    assert train.main(argv) == 0
    return root / "run"


MODELS = {"shipped": lambda request: ROOT / "weights" / "shakespeare",
          "fresh": lambda request: request.getfixturevalue("fresh_model"),
          "finetuned-gpt2": lambda request: request.getfixturevalue("finetuned_gpt2")}  # fmt: skip


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """(npgpt weights folder, exported Hugging Face folder)."""
    weights = MODELS[request.param](request)
    out = export(weights, tmp_path_factory.mktemp("hf") / request.param)
    return weights, out


def hf_model(folder):
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    return model.eval()


def test_transformers_logits_equal_npgpt_logits(exported):
    weights, out = exported
    ours, _ = load_model(weights)
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, ours.config.n_ctx))
    with torch.no_grad():
        theirs = hf_model(out)(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours.backend.to_numpy(ours.forward(ids)), rtol=0, atol=1e-4)


def test_greedy_generations_agree_for_64_tokens(exported, shakespeare_text):
    """64 tokens (48 for the fine-tuned GPT-2, whose context is 64)."""
    weights, out = exported
    ours, tokenizer = load_model(weights)
    prompt = tokenizer.encode(shakespeare_text[:200])[:16]
    n_new = min(64, ours.config.n_ctx - len(prompt))  # transformers cannot go past n_positions
    mine = list(generate_ids(ours, prompt, n_new, SamplingConfig(greedy=True), use_cache=True))
    model, step, past, theirs = hf_model(out), torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n_new):  # transformers' cached forward, argmax each step (generate() would stop at eos)
            result = model(step, past_key_values=past, use_cache=True)
            past, step = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            theirs.append(int(step))
    assert theirs == mine


def test_the_hf_tokenizer_gives_npgpt_ids_on_tinyshakespeare(exported, shakespeare_text):
    weights, out = exported
    _, tokenizer = load_model(weights)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf, transformers.GPT2TokenizerFast)
    ids = tokenizer.encode(shakespeare_text, allowed_special="all")
    assert hf(shakespeare_text)["input_ids"] == ids
    assert hf.decode(ids[:500]) == tokenizer.decode(ids[:500])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=40), st.just(EOT), st.sampled_from([" ", "\n", "  ", "'s", "ll"])), max_size=8).map("".join))
def test_the_hf_tokenizer_gives_npgpt_ids_on_any_text(exported, text):
    hf, tokenizer = tokenizers(*exported)
    if EOT not in tokenizer.special_tokens:
        text = text.replace(EOT, "")  # the shipped vocabulary has no special tokens
    assert hf(text)["input_ids"] == tokenizer.encode(text, allowed_special="all")


_TOKENIZERS: dict = {}


def tokenizers(weights, out):
    """(transformers' tokenizer of the export, npgpt's tokenizer), loaded once per folder."""
    if out not in _TOKENIZERS:
        _TOKENIZERS[out] = transformers.AutoTokenizer.from_pretrained(out), load_model(weights)[1]
    return _TOKENIZERS[out]


def test_converting_the_export_back_is_bit_exact(exported, tmp_path):
    weights, out = exported
    result = subprocess.run([sys.executable, "tools/convert_gpt2.py", str(out), "--name", "back", "--out-root", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    original, _ = load_safetensors(weights / "model.safetensors")
    back, _ = load_safetensors(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    for name in original:
        assert original[name].dtype == back[name].dtype and np.array_equal(original[name], back[name]), name
    ours, theirs = load_model(weights)[1], load_model(tmp_path / "back")[1]
    sample = "ROMEO:\nWhat light through yonder window breaks?" + (EOT if EOT in ours.special_tokens else "")
    assert ours.encode(sample, allowed_special="all") == theirs.encode(sample, allowed_special="all")


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.sampled_from([4, 8]), st.integers(0, 50), st.integers(2, 40), st.integers(0, 9))
def test_any_config_exports_and_loads(n_layer, n_head, head_size, padding, n_ctx, seed):
    """Layers, heads, widths, vocabulary sizes (padding rows past a byte vocabulary) and contexts."""
    import tempfile
    from pathlib import Path

    config = GPTConfig(vocab_size=256 + padding, n_ctx=n_ctx, n_embd=n_head * head_size, n_head=n_head, n_layer=n_layer)
    params = GPT.init(config, seed=seed).to_numpy()
    params["wte.weight"][256:] = 0  # padding rows: the tokenizer has 256 ids
    with tempfile.TemporaryDirectory() as folder:
        weights, out = Path(folder) / "model", Path(folder) / "hf"
        GPT.from_numpy(config, params).save(weights / "model.safetensors")
        save(BPETokenizer({bytes([b]): b for b in range(256)}), weights)
        export(weights, out)
        ids = np.random.default_rng(seed).integers(0, 256, (2, n_ctx))
        with torch.no_grad():
            theirs = hf_model(out)(torch.from_numpy(ids)).logits.numpy()
    ours = GPT.from_numpy(config, params).forward(ids)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_a_character_tokenizer_is_refused_with_the_reason(tmp_path):
    chars = CharTokenizer.train("hello world")
    config = GPTConfig(vocab_size=chars.n_vocab, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    GPT.init(config).save(tmp_path / "m" / "model.safetensors")
    save(chars, tmp_path / "m")
    result = subprocess.run([sys.executable, "-m", "npgpt.export", str(tmp_path / "m"), str(tmp_path / "hf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "character-level" in result.stderr and "bpe:N" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


def test_a_non_empty_folder_is_not_overwritten(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "npgpt.export", "shakespeare", str(tmp_path / "hf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "--overwrite" in result.stderr and sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]
