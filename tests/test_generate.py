"""Generation: KV-cached decoding against recomputation, stopping, streaming, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt.generate as generate_module
from npgpt.config import GPTConfig
from npgpt.generate import (
    GenerationStats,
    PromptCropped,
    PromptError,
    StopStrings,
    decoding_layout,
    encode_prompt,
    generate,
    generate_ids,
    main,
    window_start,
)
from npgpt.model import GPT, init_params
from npgpt.sampling import SamplingConfig
from npgpt.tokenizer.bpe import BPETokenizer
from npgpt.weights import WeightsError, resolve_weights
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer

ROOT = __import__("conftest").ROOT
EOT = 256
CONFIG = GPTConfig(vocab_size=257, n_ctx=32, n_embd=32, n_head=4, n_layer=2)
GREEDY = SamplingConfig(greedy=True)


def byte_tokenizer() -> BPETokenizer:
    """Every byte is a token, <|endoftext|> is 256: random ids make broken UTF-8 often."""
    return BPETokenizer({bytes([i]): i for i in range(256)}, {"<|endoftext|>": EOT})


def sharp_params(config=CONFIG, seed=0, emit=None) -> dict[str, np.ndarray]:
    """GPT-2 init with weights x10, so greedy decoding varies instead of repeating one id.
    With `emit`, the model always predicts that id: ln_f outputs the token's (huge)
    embedding, whose dot product with itself dwarfs every other logit."""
    params = {k: v if ".ln_" in k or k.startswith("ln_") else v * 10 for k, v in init_params(config, seed).items()}
    if emit is not None:
        params["wte.weight"][emit] *= 100
        params["ln_f.weight"][:] = 0
        params["ln_f.bias"][:] = params["wte.weight"][emit]
    return params


def sharp_model(backend="numpy", config=CONFIG, emit=None) -> GPT:
    return GPT.from_numpy(config, sharp_params(config, emit=emit), backend)


@pytest.fixture
def weights_dir(tmp_path):
    """A folder as --weights expects it: model.safetensors and the tokenizer's files."""
    sharp_model().save(tmp_path / "model.safetensors")
    save_tokenizer(byte_tokenizer(), tmp_path)
    return tmp_path


# -- the token loop -------------------------------------------------------------------------
def test_cached_generation_equals_recompute_without_cache(backend):
    model = sharp_model(backend)
    prompt = [5, 17, 101, 3]
    cached = list(generate_ids(model, prompt, CONFIG.n_ctx - len(prompt), GREEDY, use_cache=True))
    recomputed = list(generate_ids(model, prompt, CONFIG.n_ctx - len(prompt), GREEDY, use_cache=False))
    assert cached == recomputed
    assert len(set(cached)) > 3  # a real sequence, not one id repeated


@pytest.mark.parametrize("on_blas", [False, True])
def test_decoding_layout_keeps_values_and_generates_the_same_ids(backend, on_blas, monkeypatch):
    """on_blas: as without numba (no compiled step; decoding's products on OpenBLAS)."""
    if on_blas:
        monkeypatch.setattr(generate_module, "compiled_step", lambda: None)
    model, before = sharp_model(backend), sharp_params()
    prompt = [5, 17, 101, 3]
    expected = list(generate_ids(model, prompt, CONFIG.n_ctx - len(prompt), GREEDY))
    for threads in (2, 1):  # from 2 threads attn.c_proj too (without numba); 1 thread lays it out row-major again
        assert decoding_layout(model, threads) is model
        if model.backend.name == "numpy":  # the products' long side in rows: wte and mlp.c_proj column-major
            assert model.params["wte.weight"].flags.f_contiguous and not model.params["wte.weight"].flags.c_contiguous
            assert model.params["h.1.mlp.c_proj.weight"].flags.f_contiguous and model.params["h.1.attn.c_attn.weight"].flags.c_contiguous
            attn_proj = model.params["h.1.attn.c_proj.weight"].flags
            column_major = threads == 2 and generate_module.compiled_step() is None  # OpenBLAS's 2 threads, not the compiled step's
            assert (attn_proj.f_contiguous, attn_proj.c_contiguous) == ((True, False) if column_major else (False, True))
        for name, value in model.to_numpy().items():
            np.testing.assert_array_equal(value, before[name])
        assert list(generate_ids(model, prompt, CONFIG.n_ctx - len(prompt), GREEDY)) == expected
        assert list(generate_ids(model, prompt, CONFIG.n_ctx - len(prompt), GREEDY, use_cache=False)) == expected


def test_same_seed_same_text_on_every_backend(backend):
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95)
    def run(model):
        return list(generate_ids(model, [1, 2, 3], 20, sampling, np.random.default_rng(7)))

    assert run(sharp_model(backend)) == run(sharp_model("numpy"))
    assert run(sharp_model("numpy")) != list(generate_ids(sharp_model(), [1, 2, 3], 20, sampling, np.random.default_rng(8)))


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=0.8)])
def test_cached_and_recomputed_generation_agree_past_the_context(sampling):
    """Both paths follow one window rule, so they give the same ids long after the cache
    first fills (float64, so round-off cannot flip a choice)."""
    model = GPT.from_numpy(CONFIG, sharp_params(CONFIG), "numpy", "float64")
    runs = [list(generate_ids(model, [5, 17], 3 * CONFIG.n_ctx, sampling, np.random.default_rng(3), use_cache=cache))
            for cache in (True, False)]  # fmt: skip
    assert runs[0] == runs[1]
    assert sampling.greedy or len(set(runs[0][CONFIG.n_ctx :])) > 3  # sampled: a varied text past the context


def test_the_window_restarts_at_the_last_half_of_the_context():
    assert window_start(0, 32, 32) == 0 and window_start(0, 33, 32) == 17 and window_start(17, 49, 32) == 17
    assert window_start(17, 50, 32) == 34


def test_generation_continues_past_the_context():
    """A full cache is rebuilt from the last n_ctx / 2 tokens (a sliding window)."""
    stats = GenerationStats()
    ids = list(generate_ids(sharp_model(), list(range(30)), 50, GREEDY, stats=stats))
    assert len(ids) == 50 and stats.new_tokens == 50 and stats.prompt_tokens == 30


def test_nothing_is_computed_ahead_of_the_consumer(monkeypatch):
    model, calls = sharp_model(), []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    tokens = generate_ids(model, [1], 10, GREEDY)
    next(tokens), next(tokens)
    assert len(calls) == 2  # the prompt, then the first new id


def test_prompt_must_fit_the_context():
    with pytest.raises(ValueError, match="n_ctx"):
        list(generate_ids(sharp_model(), list(range(CONFIG.n_ctx + 1)), 1))


# -- text, end of text, stop strings ---------------------------------------------------------
def test_streamed_text_equals_decoding_the_ids():
    """Pieces are whole UTF-8 characters, and together they are exactly decode(ids)."""
    model, tok = sharp_model(), byte_tokenizer()
    sampling = SamplingConfig(temperature=1.5)
    ids = list(generate_ids(model, [104, 105], 25, sampling, np.random.default_rng(3)))
    ids = ids[: ids.index(EOT)] if EOT in ids else ids
    pieces = list(generate(model, tok, "hi", max_new_tokens=25, sampling=sampling, seed=3))
    assert "".join(pieces) == tok.decode(ids)
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)


def test_generation_stops_at_end_of_text():
    model, tok = sharp_model(emit=EOT), byte_tokenizer()
    assert list(generate_ids(model, [65], 3, GREEDY)) == [EOT, EOT, EOT]
    stats = GenerationStats()
    assert list(generate(model, tok, "A", max_new_tokens=10, stats=stats)) == []
    assert stats.new_tokens == 1


def test_generation_stops_before_a_stop_string():
    model, tok = sharp_model(), byte_tokenizer()
    full = "".join(generate(model, tok, "ab", max_new_tokens=20, sampling=GREEDY))
    stop = full[6:8]
    text = "".join(generate(model, tok, "ab", max_new_tokens=20, sampling=GREEDY, stop=["\0never", stop]))
    assert text == full[: full.index(stop)]


@settings(max_examples=200)
@given(
    st.text(alphabet="abc\n", max_size=30),
    st.lists(st.integers(0, 30), max_size=6),
    st.lists(st.text(alphabet="abc\n", min_size=0, max_size=4), max_size=3),
)
def test_stop_strings_cut_at_the_first_occurrence_however_the_text_arrives(text, cuts, stops):
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    held = StopStrings(stops)
    shown = "".join(held.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + held.release()
    hits = [text.find(s) for s in stops if s and s in text]
    assert shown == (text[: min(hits)] if hits else text)
    assert held.stopped == bool(hits)


# -- the prompt ---------------------------------------------------------------------------------
def test_long_prompts_are_cropped_to_their_last_tokens_or_refused():
    tok = byte_tokenizer()
    ids, dropped = encode_prompt(tok, "x" * 40 + "0123456789", n_ctx=10)
    assert (tok.decode(ids), dropped) == ("0123456789", 40)
    with pytest.raises(PromptError, match="context"):
        encode_prompt(tok, "x" * 11, n_ctx=10, crop=False)
    assert encode_prompt(tok, "", n_ctx=10) == ([EOT], 0)  # an empty prompt starts at <|endoftext|>
    with pytest.warns(PromptCropped):
        list(generate(sharp_model(), tok, "y" * 100, max_new_tokens=1))


# -- finding weights ------------------------------------------------------------------------------
def test_weights_are_found_by_folder_file_or_name(weights_dir, tmp_path, monkeypatch):
    file = weights_dir / "model.safetensors"
    assert resolve_weights(weights_dir) == file
    assert resolve_weights(file) == file
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine").symlink_to(weights_dir)
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("mine").resolve() == file.resolve()
    with pytest.raises(WeightsError, match="convert_gpt2.py"):
        resolve_weights("nonexistent")
    with pytest.raises(WeightsError, match="convert_gpt2.py"):
        resolve_weights(tmp_path / "missing.safetensors")


# -- the CLI -----------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_reproducibly_with_stats(weights_dir, capsys):
    args = ("--weights", weights_dir, "--prompt", "hi", "--max-new-tokens", 8, "--seed", 1, "--top-k", 20)
    code, out, err = run_cli(capsys, *args, "--stats")
    assert code == 0 and out.endswith("\n")
    assert "tokens/s" in err and "prompt:" in err and "memory:" in err
    assert run_cli(capsys, *args)[1] == out
    code, two, _ = run_cli(capsys, *args, "--num-samples", 2)
    assert two.startswith(out[:-1]) and "\n---\n" in two


def test_cli_crop_notice_and_no_crop(weights_dir, capsys):
    code, _, err = run_cli(capsys, "--weights", weights_dir, "--prompt", "z" * 100, "--max-new-tokens", 2)
    assert code == 0 and "notice" in err and "cropped to its last 32 tokens" in err
    code, out, err = run_cli(capsys, "--weights", weights_dir, "--prompt", "z" * 100, "--no-crop")
    assert code == 1 and out == "" and "--no-crop" in err and "Traceback" not in err


def test_cli_missing_weights_say_how_to_get_them(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--weights", tmp_path / "nowhere")
    assert code == 1 and "convert_gpt2.py" in err and "default" in err


def test_cli_unknown_or_missing_backend_says_what_to_do(weights_dir, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "--weights", weights_dir, "--backend", "nosuchbackend")
    assert code == 1 and "available here: numpy" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy not installed, whatever this machine has
    code, _, err = run_cli(capsys, "--weights", weights_dir, "--backend", "cupy")
    assert code == 1 and "npgpt[cupy13]" in err and "npgpt[cupy]" in err and "Traceback" not in err


def test_cli_on_cupy_gives_numpys_text_where_it_runs_else_says_why(weights_dir, capsys, monkeypatch):
    """`--backend cupy` on this machine: with CuPy and a GPU, NumPy's text; without, exit 1
    with the reason get_backend gives. On the CuPy double (tests/fake_cupy.py) it runs."""
    from npgpt.backend import BackendError, get_backend

    args = ("--weights", weights_dir, "--prompt", "hi", "--max-new-tokens", 6, "--seed", 3)
    code, expected, _ = run_cli(capsys, *args)
    assert code == 0 and expected
    try:
        get_backend("cupy")
        why_not = None
    except BackendError as e:
        why_not = str(e)
    code, out, err = run_cli(capsys, *args, "--backend", "cupy")
    if why_not is None:
        assert (code, out) == (0, expected)
    else:
        assert code == 1 and out == "" and why_not in err and "Traceback" not in err
    __import__("fake_cupy").install(monkeypatch)
    assert run_cli(capsys, *args, "--backend", "cupy")[:2] == (0, expected)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--temperature", "-1"), "temperature"),
        (("--top-k", "0"), "top_k"),
        (("--top-p", "1.5"), "top_p"),
        (("--max-new-tokens", "-3"), "max-new-tokens"),
        (("--num-samples", "0"), "num-samples"),
    ],
)
def test_cli_rejects_invalid_values(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(list(flags))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_module_runs_as_a_script_reading_the_prompt_from_stdin(weights_dir):
    result = subprocess.run(
        [sys.executable, "-m", "npgpt.generate", "--weights", str(weights_dir), "--greedy", "--max-new-tokens", "5"],
        input=b"Hello", capture_output=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected = "".join(generate(sharp_model(), byte_tokenizer(), "Hello", max_new_tokens=5, sampling=GREEDY))
    assert result.stdout.decode("utf-8") == expected + "\n"


def test_shipped_default_generates_with_no_flags():
    """`python -m npgpt.generate` with no flags and no stdin works offline on the shipped model."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "npgpt.generate", "--max-new-tokens", "30", "--seed", "0"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20
