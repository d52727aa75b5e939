"""`python -m npgpt.train` and `python -m npgpt.eval` end to end on a tiny corpus and model:
checkpoint contents, bit-for-bit resume (also after a real Ctrl-C), divergence handling,
atomic checkpoints, tokenizer choices, fine-tuning, and the sliding-window perplexity."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, data_path
from npgpt import checkpoint, train
from npgpt.checkpoint import load_safetensors
from npgpt.distributed import Comm
from npgpt.eval import perplexity, sliding_windows
from npgpt.model import GPT

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 12
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--warmup-iters", "2", "--log-interval", "1", "--eval-iters", "2"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def run(corpus, out, *flags) -> int:
    return train.main(["--data", corpus, "--out-dir", str(out), *TINY, *flags])


def params_and_moments(out) -> dict[str, np.ndarray]:
    params, _ = load_safetensors(out / "model.safetensors")
    moments, meta = load_safetensors(out / "trainer_state.safetensors")
    return {**params, **moments}


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def saved_step(out) -> int:
    return int(load_safetensors(out / "model.safetensors")[1]["npgpt.step"])


def test_training_writes_a_loadable_checkpoint_and_a_log(corpus, tmp_path):
    out = tmp_path / "run"
    assert run(corpus, out, "--max-iters", "12", "--eval-interval", "6", "--checkpoint-interval", "5") == 0
    assert {"model.safetensors", "trainer_state.safetensors", "log.jsonl", "npgpt_tokenizer.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temp files left behind"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 13))
    assert [r["step"] for r in log if "val_loss" in r] == [6, 12]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in log if "loss" in r)
    assert log[-1]["val_perplexity"] == pytest.approx(math.exp(log[-1]["val_loss"]))
    assert log[0]["loss"] == pytest.approx(math.log(len(set(TEXT))), abs=0.3)  # ~uniform at init
    assert saved_step(out) == 12
    # generate's loader reads the folder
    from npgpt.weights import load_model

    model, tokenizer = load_model(out)
    assert tokenizer.decode(tokenizer.encode("Speak")) == "Speak" and model.config.n_ctx == 8


def test_resume_is_bit_for_bit(corpus, tmp_path, backend):
    """12 steps straight == 5 steps, stop, resume, 7 more: parameters and AdamW moments
    identical to the last bit (dropout and gradient accumulation on), on every backend."""
    flags = ["--dropout", "0.1", "--grad-accum", "2", "--checkpoint-interval", "4", "--eval-interval", "5",
             "--backend", backend.name]  # fmt: skip
    assert run(corpus, tmp_path / "straight", *flags, "--max-iters", "12") == 0
    assert run(corpus, tmp_path / "split", *flags, "--max-iters", "5", "--lr-decay-iters", "12") == 0
    assert saved_step(tmp_path / "split") == 5
    assert train.main(["--resume", "--out-dir", str(tmp_path / "split"), "--max-iters", "12"]) == 0
    assert_identical(params_and_moments(tmp_path / "straight"), params_and_moments(tmp_path / "split"))
    # the resumed log continues where the checkpoint was: one line per step, no repeats
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))


def test_resume_refuses_changed_settings_and_mismatched_files(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(corpus, out, "--max-iters", "3") == 0
    assert train.main(["--resume", "--out-dir", str(out), "--n-embd", "16"]) == 1
    assert "--n-embd (16 vs saved 8)" in capsys.readouterr().err
    assert run(corpus, out, "--max-iters", "3") == 1  # starting over an existing run is refused
    assert "--resume" in capsys.readouterr().err
    # a model file from another step than the trainer state (a save cut off between them)
    params, meta = load_safetensors(out / "model.safetensors")
    checkpoint.save_safetensors(out / "model.safetensors", dict(params), {**meta, "npgpt.step": "2"})
    assert train.main(["--resume", "--out-dir", str(out), "--max-iters", "5"]) == 1
    assert "cannot be resumed" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_for_bit(corpus, tmp_path):
    """A real SIGINT to the CLI: it finishes the step, saves, exits 130; resuming then
    reaches exactly the parameters of the uninterrupted run."""
    flags = [*TINY, "--lr-decay-iters", "400", "--checkpoint-interval", "1000", "--eval-interval", "0"]
    assert run(corpus, tmp_path / "straight", *flags, "--max-iters", "60") == 0
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.train", "--data", corpus, "--out-dir", str(out), *flags,
                             "--max-iters", "400"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stderr:
        if line.startswith("step") and "/400" in line and int(line.split()[1].split("/")[0]) >= 3:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "Traceback" not in rest and "--resume" in rest
    k = saved_step(out)
    assert 3 <= k < 60, "interrupt it earlier: the comparison run is only 60 steps"
    assert train.main(["--resume", "--out-dir", str(out), "--max-iters", "60"]) == 0
    assert_identical(params_and_moments(tmp_path / "straight"), params_and_moments(out))


def test_ctrl_c_in_the_middle_of_a_print_is_no_error(tmp_path, monkeypatch):
    """The Ctrl-C handler may run while the loop prints a report line to the same stream.
    Its notice used to go through that stream's buffer, and the reentrant write raised
    RuntimeError, which under mpiexec ended one rank and hung the job (1 run in ~50 of
    test_ctrl_c_on_mpiexec_saves_one_checkpoint under load)."""
    trainer = types.SimpleNamespace(interrupted=False, comm=Comm())

    class Interrupted(io.FileIO):  # the signal lands while the buffered line is written out
        def write(self, data):
            if not trainer.interrupted:
                train.Trainer._on_interrupt(trainer, signal.SIGINT, None)
            return super().write(data)

    stream = io.TextIOWrapper(io.BufferedWriter(Interrupted(tmp_path / "stderr", "w")), encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", stream)
    train.say("step      4/100 | loss 3.5189")
    stream.close()
    written = (tmp_path / "stderr").read_text(encoding="utf-8")
    assert trainer.interrupted and "Ctrl-C: finishing this step" in written and "step      4/100" in written
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts (one process)
        train.Trainer._on_interrupt(trainer, signal.SIGINT, None)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real = GPT.loss_and_grads
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):
        calls["n"] += 1
        loss, grads = real(self, *args, **kwargs)
        if calls["n"] >= 6:  # step 6 onwards: the loss and gradients blow up
            grads = {k: v * np.float32("nan") for k, v in grads.items()}
            loss = loss * np.float32("inf")
        return loss, grads

    monkeypatch.setattr(GPT, "loss_and_grads", diverging)
    out = tmp_path / "run"
    assert run(corpus, out, "--max-iters", "20", "--checkpoint-interval", "4") == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint (step 4)" in err
    assert saved_step(out) == 4
    model_params, _ = load_safetensors(out / "model.safetensors")
    assert all(np.isfinite(v).all() for v in model_params.values())


def test_a_failed_save_leaves_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(corpus, out, "--max-iters", "2", "--lr-decay-iters", "6") == 0
    before = params_and_moments(out)
    replace, calls = os.replace, {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the trainer state of the step-4 checkpoint: disk full
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    assert train.main(["--resume", "--out-dir", str(out), "--max-iters", "6", "--checkpoint-interval", "2"]) == 1
    assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".pending"))], "temp file left behind"
    # neither file moved on to step 4: the step-2 checkpoint is whole, and resumes
    assert saved_step(out) == 2
    state, _ = load_safetensors(out / "trainer_state.safetensors")
    assert all(np.array_equal(state[k], before[k]) for k in state)
    assert train.main(["--resume", "--out-dir", str(out), "--max-iters", "6"]) == 0


@pytest.mark.parametrize("spec", ["bytes", "bpe:300", "gpt2"])
def test_tokenizer_choices(corpus, tmp_path, spec):
    if spec == "gpt2":
        spec = str(data_path("gpt2/encoder.json").parent)
    out = tmp_path / "run"
    assert run(corpus, out, "--tokenizer", spec, "--max-iters", "2", "--val-fraction", "0.2") == 0
    from npgpt.tokenizer import load as load_tokenizer

    tok = load_tokenizer(out)
    expected = {"bytes": 256, "bpe:300": 300}.get(spec, 50257)
    assert tok.n_vocab == expected
    params, _ = load_safetensors(out / "model.safetensors")
    assert params["wte.weight"].shape == (expected, 8)


def test_fine_tuning_starts_from_the_checkpoint(corpus, tmp_path):
    base = tmp_path / "base"
    assert run(corpus, base, "--max-iters", "5") == 0
    tuned = tmp_path / "tuned"
    assert train.main(["--data", corpus, "--out-dir", str(tuned), "--init-from", str(base), "--max-iters", "3",
                       "--lr", "1e-4", "--warmup-iters", "1", "--batch-size", "2", "--log-interval", "1"]) == 0  # fmt: skip
    # its first logged loss is the base model's loss on the first batch: it starts from the base
    from npgpt.data import BatchSampler, split_tokens
    from npgpt.weights import load_model

    model, tok = load_model(base)
    ids, targets = BatchSampler(split_tokens(np.asarray(tok.encode(TEXT)), 0.1)[0], 2, 8, seed=1337).batch(0)
    first = json.loads((tuned / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(model.loss(ids, targets)), rel=1e-6)
    assert (tuned / "npgpt_tokenizer.json").read_text() == (base / "npgpt_tokenizer.json").read_text()


def test_help():
    for module in ("npgpt.train", "npgpt.eval"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout


# -- evaluation ----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 16), st.data())
def test_sliding_windows_score_every_token_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    scored = []
    for begin, end, first in sliding_windows(n, context, stride):
        assert end - 1 - begin <= context  # inputs fit the context
        assert begin < first < end or n < 2
        scored += range(first, end)
        # each scored token sees at least min(its position, context - stride) tokens of history
        assert all(p - begin >= min(p, context - stride) for p in range(first, end))
    assert scored == list(range(1, n))


def test_eval_cli_and_exact_perplexity(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(corpus, out, "--max-iters", "3") == 0
    from npgpt.eval import main
    from npgpt.weights import load_model

    model, tok = load_model(out)
    ids = np.asarray(tok.encode(TEXT[:9]))  # fits one window of the 8-token context
    full = float(model.loss(ids[None, :-1], ids[None, 1:]))
    assert perplexity(model, ids, stride=3)["loss"] == pytest.approx(full, rel=1e-6)
    # disjoint windows are the mean of independent window losses
    ids = np.asarray(tok.encode(TEXT[:33]))  # 32 targets = 4 windows of 8
    windows = [float(model.loss(ids[None, i : i + 8], ids[None, i + 1 : i + 9])) for i in range(0, 32, 8)]
    assert perplexity(model, ids, stride=8)["loss"] == pytest.approx(np.mean(windows), rel=1e-6)

    assert main(["--weights", str(out), "--data", corpus, "--stride", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_evaluated"] == len(TEXT) - 1 and result["stride"] == 4 and result["context"] == 8
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert main(["--weights", str(out), "--data", corpus, "--stride", "9"]) == 1
    assert "stride must be in [1, context=8]" in capsys.readouterr().err


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, monkeypatch):
    """Two micro-batches of 2 rows give the step that one batch of their 4 rows gives:
    the accumulated gradient is the mean of the micro-batch means."""
    from npgpt.config import GPTConfig
    from npgpt.data import BatchSampler

    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 11, (4, 6)), rng.integers(0, 11, (4, 6))
    tokens = rng.integers(0, 11, 200)
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        args = train.build_parser().parse_args(["--out-dir", str(tmp_path), *TINY, "--block-size", "6",
                                                "--batch-size", str(batch_size), "--grad-accum", str(accum)])  # fmt: skip
        model = GPT.init(GPTConfig(vocab_size=11, n_ctx=6, n_embd=8, n_head=2, n_layer=1), dtype="float64")
        trainer = train.Trainer(args, model, None, (tokens, tokens[:0]))
        half = lambda self, step, micro=0: (ids, targets) if self.batch_size == 4 else (  # noqa: E731
            ids[2 * micro : 2 * micro + 2], targets[2 * micro : 2 * micro + 2])  # fmt: skip
        monkeypatch.setattr(BatchSampler, "batch", half)
        loss, _ = trainer.train_step()
        results.append((float(loss), model.to_numpy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, rtol=0, atol=1e-12, err_msg=name)
