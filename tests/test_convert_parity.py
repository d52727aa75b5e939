"""Converted checkpoints compute what the published model computes.

Sources are built here with transformers (random weights, no downloads) and saved the ways
GPT-2 is published; OpenAI's TF layout comes from the gpt2-tf-tiny fixture. The reference
is transformers' GPT2LMHeadModel loaded from the same folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import data_path
from convert_sources import build_hf_model, hf_logits_fn, load_cli, npgpt_logits_fn, random_prompts, save_hf_folder
from npgpt.checkpoint import load_checkpoint
from npgpt.config import GPTConfig
from npgpt.convert import ConversionError, convert
from npgpt.convert.mapping import config_from_hf, expand_rows, params_from_hf
from npgpt.convert.parity import compare, greedy
from npgpt.model import GPT, param_shapes
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def assert_parity(reference, candidate, prompts, n_new=32, atol=1e-4):
    for report in compare(reference, candidate, prompts, n_new):
        assert report.max_abs_logit_diff < atol
        assert report.top1_agreement == 1.0
        assert report.perplexity_candidate == pytest.approx(report.perplexity_reference, rel=1e-4)
        assert report.greedy_identical, (report.greedy_reference, report.greedy_candidate)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_folder_parity(tmp_path, fmt, dtype):
    source = save_hf_folder(build_hf_model(seed=1), tmp_path / "src", fmt, dtype)
    checkpoint = convert(source, tmp_path / "out")
    model = GPT.load(checkpoint)
    assert model.config == GPTConfig(vocab_size=300, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    reference = transformers.GPT2LMHeadModel.from_pretrained(source).float().eval()
    assert_parity(hf_logits_fn(reference), npgpt_logits_fn(model), random_prompts(300))


def test_old_style_state_dict_and_other_depth(tmp_path):
    """As on the hub: no "transformer." prefix, attention-mask buffers, a tied lm_head;
    6 layers like distilgpt2."""
    from safetensors.numpy import save_file

    hf = build_hf_model(seed=2, n_layer=6)
    source = save_hf_folder(hf, tmp_path / "src")
    state = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"].copy()
    for i in range(6):
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        state[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(state, source / "model.safetensors")
    model = GPT.load(convert(source, tmp_path / "out"))
    assert model.config.n_layer == 6
    assert_parity(hf_logits_fn(hf), npgpt_logits_fn(model), random_prompts(300), n_new=8)


def test_sharded_safetensors(tmp_path):
    """Large hub models may be split: model.safetensors.index.json maps names to shards."""
    from safetensors.numpy import save_file

    hf = build_hf_model(seed=4)
    source = save_hf_folder(hf, tmp_path / "src")
    (source / "model.safetensors").unlink()
    state = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({k: state[k] for k in shard_names}, source / shard)
    weight_map = {k: shard for shard, shard_names in shards.items() for k in shard_names}
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params, _ = load_checkpoint(convert(source, tmp_path / "out"))
    for name, value in state.items():
        np.testing.assert_array_equal(params[name.removeprefix("transformer.")], value)


def test_tf_checkpoint_matches_expected(tmp_path, backend):
    """OpenAI's TF layout: engine logits and greedy ids equal transformers' (expected.json)."""
    folder = data_path("gpt2-tf-tiny")
    expected = json.loads((folder / "expected.json").read_text())
    tolerance = expected["suggested_tolerance"]
    out = tmp_path / "tf-tiny"
    model = GPT.load(convert(folder, out), backend=backend)
    last = backend.to_numpy(model.forward(np.asarray([expected["prompt_ids"]])))[0, -1]  # (V,)
    np.testing.assert_allclose(last[:20], expected["last_logits_ids_0_19"], rtol=0, atol=tolerance["logit_abs"])
    top = expected["last_logits_top10"]
    assert np.argsort(-last)[:10].tolist() == [t["id"] for t in top]
    np.testing.assert_allclose(last[[t["id"] for t in top]], [t["logit"] for t in top], rtol=0, atol=tolerance["logit_abs"])
    assert abs(last.astype(np.float64).sum() - expected["last_logits_sum"]) < tolerance["sum_abs"]
    assert abs(np.linalg.norm(last.astype(np.float64)) - expected["last_logits_l2_norm"]) < tolerance["l2_abs"]
    new = greedy(npgpt_logits_fn(model), expected["prompt_ids"], len(expected["greedy_new_ids"]))
    assert new == expected["greedy_new_ids"]
    tokenizer = load_tokenizer(out)  # encoder.json + vocab.bpe were copied beside the weights
    assert tokenizer.encode(expected["prompt_text"]) == expected["prompt_ids"]


@pytest.mark.slow
def test_full_124M_shape_parity(tmp_path):
    """The one full-size test: GPT-2 124M's shape (random weights) through safetensors."""
    hf = build_hf_model(seed=3, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    source = save_hf_folder(hf, tmp_path / "src")
    model = GPT.load(convert(source, tmp_path / "out"))
    assert model.config == GPTConfig.preset("gpt2")
    # one prompt and 8 greedy tokens: each full-size forward costs about a second here
    assert_parity(hf_logits_fn(hf), npgpt_logits_fn(model), random_prompts(50257, lengths=(24,)), n_new=8)


def test_cli_check_and_gpt2_vocabulary_round_trip(tmp_path, capsys):
    """The CLI converts (float16 output) and --check reports parity on text prompts; the
    copied vocab.json/merges.txt load into npgpt's tokenizer as GPT-2's vocabulary."""
    gpt2 = data_path("gpt2")
    source = save_hf_folder(build_hf_model(vocab_size=50257), tmp_path / "src", gpt2_vocab=gpt2)
    argv = [str(source), "--name", "tiny", "--out-root", str(tmp_path / "weights"), "--dtype", "float16", "--check", "--n-new", "8"]
    assert load_cli().main(argv) == 0
    report = capsys.readouterr().out
    assert "top-1 agreement: 100.00%" in report and "greedy 8-token generations identical: 5/5" in report
    out = tmp_path / "weights" / "tiny"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "vocab.json", "merges.txt"}
    params, _ = load_checkpoint(out / "model.safetensors")
    assert all(p.dtype == np.float16 for p in params.values())
    converted, original = load_tokenizer(out), load_tokenizer(gpt2)
    assert converted.n_vocab == original.n_vocab == 50257 and converted.eot_id == 50256
    assert all(converted.token_bytes(i) == original.token_bytes(i) for i in range(50257))
    text = "Hello world! Ünïcödé, numbers 12345 and <|endoftext|> too."
    ids = converted.encode(text, allowed_special="all")
    assert ids == original.encode(text, allowed_special="all") and converted.decode(ids) == text


# --- the name table and its errors ------------------------------------------------------


def test_name_table_covers_every_parameter():
    config = GPTConfig(vocab_size=10, n_ctx=8, n_embd=8, n_head=2, n_layer=3)
    rows = expand_rows(config.n_layer)
    assert [row.npgpt for row in rows] == list(param_shapes(config))
    assert all(row.tf_kernel == row.openai_tf.endswith("/w") for row in rows)


def tiny_state(config):
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in param_shapes(config).items()}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("h.1.mlp.c_fc.bias"), r"missing tensors: h\.1\.mlp\.c_fc\.bias"),
        (lambda s: s.update({"h.2.ln_1.weight": np.ones(8, np.float32)}), r"unknown tensors.*h\.2\.ln_1\.weight"),
        (lambda s: s.update({"h.0.attn.c_proj.weight": np.ones((8, 9), np.float32)}), r"'h\.0\.attn\.c_proj\.weight'.*\[8, 9\].*\[8, 8\]"),
        (lambda s: s.update({"lm_head.weight": np.zeros((10, 8), np.float32)}), r"lm_head\.weight.*untied"),
        (lambda s: s.update({"transformer.wpe.weight": s["wpe.weight"]}), r"both with and without"),
        (lambda s: s.update({"wte.weight": np.ones((10, 8), np.int32)}), r"'wte\.weight' has dtype int32"),
    ],
)
def test_mapping_errors_name_the_tensor(edit, message):
    config = GPTConfig(vocab_size=10, n_ctx=8, n_embd=8, n_head=2, n_layer=2)
    state = tiny_state(config)
    edit(state)
    with pytest.raises(ConversionError, match=message):
        params_from_hf(state, config)


def test_unsupported_configs_are_refused():
    assert config_from_hf({"n_layer": 6}).n_layer == 6  # distilgpt2: defaults elsewhere
    with pytest.raises(ConversionError, match="activation_function='relu'"):
        config_from_hf({"activation_function": "relu"})
    with pytest.raises(ConversionError, match="model_type"):
        config_from_hf({"model_type": "llama"})


def test_folder_without_weights_or_tokenizer(tmp_path):
    with pytest.raises(ConversionError, match="neither a Hugging Face"):
        convert(tmp_path, tmp_path / "out")
    source = save_hf_folder(build_hf_model(), tmp_path / "src")
    (source / "merges.txt").unlink()
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert(source, tmp_path / "out")
