"""Every expected failure of every CLI, through the real command line in a subprocess: a
non-zero exit, one line `error: ...` on stderr naming the problem, no traceback, and no file
changed or left behind (the shipped model's sha256 is unchanged, no stray out-dir)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.tokenizer import BPETokenizer, CharTokenizer
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer

ROOT = __import__("conftest").ROOT
SHIPPED = ROOT / "weights" / "shakespeare"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 8
TINY_TRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
              "--max-iters", "2", "--eval-iters", "1"]  # fmt: skip


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def shipped_hashes():
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip(f"the shipped model {SHIPPED} is missing")
    before = sha256_tree(SHIPPED)
    yield before
    assert sha256_tree(SHIPPED) == before, "a command changed the shipped model"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models and tokenizer folders, good and broken, built once."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "a_file").write_text("not a folder")
    chars = CharTokenizer.train(TEXT)

    def model_dir(name, config, tokenizer, zero_rows_from=None):
        folder = root / name
        params = GPT.init(config, seed=0).to_numpy()
        if zero_rows_from is not None:
            params["wte.weight"][zero_rows_from:] = 0
        GPT.from_numpy(config, params).save(folder / "model.safetensors")
        save_tokenizer(tokenizer, folder)
        return folder

    small = dict(n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    model_dir("tiny", GPTConfig(vocab_size=chars.n_vocab, **small), chars)
    byte_bpe = BPETokenizer({bytes([b]): b for b in range(256)})
    model_dir("mismatch", GPTConfig(vocab_size=1024, **small), byte_bpe)  # 1024 trained rows, 256 tokens
    model_dir("padded", GPTConfig(vocab_size=300, **small), byte_bpe, zero_rows_from=256)
    model_dir("too_small", GPTConfig(vocab_size=200, **small), byte_bpe)

    # a checkpoint whose header config is invalid (n_embd not divisible by n_head)
    bad = root / "bad_config"
    bad.mkdir()
    raw = (root / "tiny" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'\\"n_head\\": 2', b'\\"n_head\\": 3')
    assert header != raw[8 : 8 + n]
    (bad / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n :])
    save_tokenizer(chars, bad)

    # a corrupted .tiktoken beside the weights
    broken = root / "broken_tiktoken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((root / "padded" / "model.safetensors").read_bytes())
    save_tokenizer(byte_bpe, broken)
    lines = (broken / "tokenizer.tiktoken").read_text().splitlines()
    lines[10] = "this is not base64"
    (broken / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")

    # Hugging Face vocabularies: one trained, then broken in four ways
    from npgpt.tokenizer import train_bpe

    trained = train_bpe(TEXT * 4, 300)
    for name in ("half_merges", "one_field", "bad_json", "bad_bytes", "gap_ids"):
        save_tokenizer(trained, root / name, format="huggingface")
    merges = (root / "half_merges" / "merges.txt").read_text("utf-8").splitlines()
    (root / "half_merges" / "merges.txt").write_text("\n".join(merges[: len(merges) // 2]) + "\n", "utf-8")
    merges[3] = merges[3].split(" ")[0]
    (root / "one_field" / "merges.txt").write_text("\n".join(merges) + "\n", "utf-8")
    vocab = (root / "bad_json" / "vocab.json").read_text("utf-8")
    (root / "bad_json" / "vocab.json").write_text(vocab[: len(vocab) // 2], "utf-8")
    raw_merges = (root / "bad_bytes" / "merges.txt").read_bytes().split(b"\n")
    raw_merges[5] = b"\xff\xfe " + raw_merges[5]
    (root / "bad_bytes" / "merges.txt").write_bytes(b"\n".join(raw_merges))
    vocab = json.loads((root / "gap_ids" / "vocab.json").read_text("utf-8"))
    last = max(vocab, key=vocab.get)
    vocab[last] += 1  # ids 0..298, then 300
    (root / "gap_ids" / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    gap = root / "gap_tiktoken"
    (gap / "model.safetensors").parent.mkdir()
    (gap / "model.safetensors").write_bytes((root / "padded" / "model.safetensors").read_bytes())
    save_tokenizer(byte_bpe, gap)
    lines = (gap / "tokenizer.tiktoken").read_text().splitlines()
    lines[-1] = lines[-1].rsplit(" ", 1)[0] + " 999"
    (gap / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    return root


def cli(*argv, stdin=None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NPGPT_DEBUG"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)  # fmt: skip


def assert_one_error_line(result, *needles, prefix_lines_allowed=False):
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (prefix_lines_allowed or len(lines) == 1), result.stderr
    assert errors[0] == lines[-1], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


GEN = ("-m", "npgpt.generate", "--max-new-tokens", "5", "--prompt", "Fi")
TRAIN = ("-m", "npgpt.train")
EVAL = ("-m", "npgpt.eval")
ENCODE = ("-m", "npgpt.tokenizer", "encode")

# (id, argv with {root} and {shipped} placeholders, phrases the error line must contain, out-dir that must not exist)
CASES = [
    ("train-into-shipped-model", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{shipped}", *TINY_TRAIN], ["--overwrite", "choose another --out-dir"], None),
    ("train-into-converted-model", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{root}/tiny", *TINY_TRAIN], ["--overwrite"], None),
    ("train-out-dir-is-a-file", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{root}/a_file", *TINY_TRAIN], ["is a file"], None),
    ("train-empty-data", [*TRAIN, "--data", "{root}/empty.txt", "--out-dir", "{root}/new/run1", *TINY_TRAIN], ["empty"], "{root}/new"),
    ("train-missing-data", [*TRAIN, "--data", "{root}/nothing.txt", "--out-dir", "{root}/run2", *TINY_TRAIN], ["no such file"], "{root}/run2"),
    ("train-bad-bpe-size", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{root}/run3", "--tokenizer", "bpe:abc", *TINY_TRAIN], ["bpe:abc", "at least 256"], "{root}/run3"),
    ("train-text-too-short", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{root}/run4", "--val-fraction", "0.999", *TINY_TRAIN], ["split has"], "{root}/run4"),
    ("train-init-from-mismatch", [*TRAIN, "--data", "{root}/corpus.txt", "--out-dir", "{root}/run5", "--init-from", "{root}/mismatch", *TINY_TRAIN], ["do not belong together"], "{root}/run5"),
    ("generate-invalid-config", [*GEN, "--weights", "{root}/bad_config"], ["config in the header is invalid", "divisible"], None),
    ("generate-corrupt-tiktoken", [*GEN, "--weights", "{root}/broken_tiktoken"], ["tokenizer.tiktoken:11"], None),
    ("generate-vocab-mismatch", [*GEN, "--weights", "{root}/mismatch"], ["256", "1024", "do not belong together"], None),
    ("generate-tokenizer-larger", [*GEN, "--weights", "{root}/too_small"], ["256 tokens", "only 200"], None),
    ("generate-missing-weights", [*GEN, "--weights", "{root}/nowhere"], ["convert_gpt2.py"], None),
    ("generate-prompt-outside-vocab", [*GEN, "--weights", "{root}/tiny", "--prompt", "Zebra \u00e9"], ["prompt cannot be encoded"], None),
    ("eval-vocab-mismatch", [*EVAL, "--weights", "{root}/mismatch", "--data", "{root}/corpus.txt"], ["do not belong together"], None),
    ("eval-stride-too-long", [*EVAL, "--weights", "{root}/tiny", "--data", "{root}/corpus.txt", "--stride", "99"], ["stride must be in"], None),
    ("eval-missing-data", [*EVAL, "--weights", "{root}/tiny", "--data", "{root}/nothing.txt"], ["nothing.txt", "No such file"], None),
    ("eval-too-short", [*EVAL, "--weights", "{root}/tiny", "--data", "{root}/corpus.txt", "--max-tokens", "1"], ["fewer than 2 tokens"], None),
    ("tokenizer-half-merges", [*ENCODE, "{root}/half_merges", "--text", "hello"], ["vocab.json", "truncated"], None),
    ("tokenizer-one-field-merge", [*ENCODE, "{root}/one_field", "--text", "hello"], ["merges.txt:4", "two tokens"], None),
    ("tokenizer-bad-json", [*ENCODE, "{root}/bad_json", "--text", "hello"], ["vocab.json:1", "invalid JSON"], None),
    ("tokenizer-bad-bytes", [*ENCODE, "{root}/bad_bytes", "--text", "hello"], ["merges.txt:6", "not utf-8"], None),
    ("tokenizer-ids-with-a-gap", [*ENCODE, "{root}/gap_ids", "--text", "hello"], ["vocab.json", "without gaps", "299 is missing"], None),
    ("generate-tiktoken-rank-gap", [*GEN, "--weights", "{root}/gap_tiktoken"], ["tokenizer.tiktoken:256", "rank 999 follows 254"], None),
    ("tokenizer-missing-folder", [*ENCODE, "{root}/nowhere", "--text", "hello"], ["no tokenizer at"], None),
    ("tokenizer-decode-unknown-id", ["-m", "npgpt.tokenizer", "decode", "{root}/tiny", "99999"], ["99999"], None),
    ("convert-missing-source", ["tools/convert_gpt2.py", "{root}/nowhere", "--out-root", "{root}/converted"], ["not a directory"], "{root}/converted"),
    ("convert-over-a-model", ["tools/convert_gpt2.py", "{root}/tiny", "--out-root", "{root}", "--name", "tiny"], ["already holds a model", "--overwrite"], None),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_expected_failures_are_one_line(case, files, shipped_hashes):
    _, argv, needles, absent = case
    fill = lambda s: s.format(root=files, shipped=SHIPPED) if isinstance(s, str) else s  # noqa: E731
    tiny_before = sha256_tree(files / "tiny")
    assert_one_error_line(cli(*map(fill, argv)), *needles)
    if absent is not None:
        assert not Path(fill(absent)).exists(), "a failed start left its out-dir behind"
    assert sha256_tree(files / "tiny") == tiny_before


def test_debug_shows_the_traceback(files):
    result = cli(*GEN, "--weights", files / "mismatch", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "WeightsError" in result.stderr
    env_result = subprocess.run([sys.executable, *GEN, "--weights", str(files / "mismatch")], cwd=ROOT, capture_output=True,
                                text=True, env={**os.environ, "NPGPT_DEBUG": "1"}, timeout=300)  # fmt: skip
    assert "Traceback" in env_result.stderr


def test_padding_rows_are_accepted_with_a_notice_and_never_sampled(files):
    result = cli(*GEN, "--weights", files / "padded", "--max-new-tokens", "40", "--seed", "0", "--temperature", "5")
    assert result.returncode == 0, result.stderr
    assert "44 padding rows" in result.stderr and "Traceback" not in result.stderr


def test_broken_pipe_ends_quietly(files):
    """`python -m npgpt.generate | head -c 10`: the reader leaves; no traceback, status 141."""
    proc = subprocess.Popen([sys.executable, *GEN[:-4], "--weights", str(files / "tiny"), "--max-new-tokens", "100000"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == b"", err.decode()


def test_ctrl_c_ends_generation_with_one_line(files):
    proc = subprocess.Popen([sys.executable, *GEN[:-4], "--weights", str(files / "tiny"), "--max-new-tokens", "100000"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert len(proc.stdout.read(10)) == 10
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.decode().splitlines() if not line.startswith("notice: numba is compiling")]  # a cold cache
    assert proc.returncode == 130 and "Traceback" not in err.decode() and lines == ["interrupted (Ctrl-C)"], err.decode()


# -- a full disk, on a small tmpfs ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of the size the test asks for (KiB); skipped where mounting is not allowed."""

    def mount(kib: int) -> Path:
        where = tmp_path / "disk"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); CI runs this as root")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
        return where

    return mount


def test_full_disk_at_the_start_of_a_run(files, small_disk):
    disk = small_disk(8)  # holds the tokenizer, not the first checkpoint
    bigger = ["--n-embd", "64", "--n-layer", "2", "--checkpoint-interval", "1"]
    result = cli(*TRAIN, "--data", files / "corpus.txt", "--out-dir", disk / "run", *TINY_TRAIN, *bigger)
    assert_one_error_line(result, "No space left on device", prefix_lines_allowed=True)
    assert not (disk / "run").exists()


def test_full_disk_while_saving_keeps_the_last_checkpoint(files, small_disk):
    # model M ~ 410 KiB, trainer state 2M: the first save needs ~3M, the second ~6M at its peak
    disk = small_disk(1700)
    flags = [*TINY_TRAIN, "--n-embd", "64", "--n-layer", "2", "--max-iters", "4", "--checkpoint-interval", "2"]
    result = cli(*TRAIN, "--data", files / "corpus.txt", "--out-dir", disk / "run", *flags)
    assert_one_error_line(result, "No space left on device", "step 2 is kept", "--resume", prefix_lines_allowed=True)
    from npgpt.checkpoint import read_checkpoint

    assert read_checkpoint(disk / "run" / "model.safetensors")[2]["npgpt.step"] == "2"
    assert not [p for p in (disk / "run").iterdir() if p.name.endswith(".tmp")]


def test_the_help_example_writes_to_runs():
    result = cli(*TRAIN, "--help")
    assert "--out-dir runs/" in " ".join(result.stdout.split()) and "weights/shakespeare --" not in result.stdout


def test_stop_accepts_escapes_and_repeats(files):
    result = cli(*GEN[:-2], "--weights", files / "tiny", "--prompt", "F", "--max-new-tokens", "400", "--seed", "1",
                 "--stop", r"\n", "--stop", "zz")  # fmt: skip
    assert result.returncode == 0 and "\n" not in result.stdout[:-1], result.stdout


def test_eval_reports_progress_and_reads_only_what_it_needs(files):
    result = cli(*EVAL, "--weights", files / "tiny", "--data", files / "corpus.txt", "--json")
    assert result.returncode == 0 and "tokens/s" in result.stderr and "ETA" in result.stderr
    assert json.loads(result.stdout)["tokens_evaluated"] == len(TEXT) - 1
