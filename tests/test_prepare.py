"""The prepare step (npgpt.prepare): ids equal to encoding each document whole, the folder
format, no-op re-runs, killed runs, bad input, and training/eval reading the folders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_path
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import prepare as P
from npgpt.tokenizer import BPETokenizer, CharTokenizer, load, save


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return load(data_path("gpt2/gpt2.tiktoken"))


@pytest.fixture(scope="module")
def gpt2_dir(gpt2, tmp_path_factory):
    return save(gpt2, tmp_path_factory.mktemp("gpt2"))


def cli(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npgpt.data", "prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def expected_splits(tokenizer, documents: list[str], seed: int, val_fraction: float):
    """Each document encoded whole (+ end-of-text), in order, sent to its split."""
    out = {"train": [], "val": []}
    for number, text in enumerate(documents):
        ids = tokenizer.encode_ordinary(text) + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
        out["val" if P.is_val(seed, number, val_fraction) else "train"] += ids
    return out


def read_split(folder, split):
    return np.asarray(P.split_tokens_of(folder, split)).tolist()


# -- cutting long documents ------------------------------------------------------------------
pieces_of_text = st.lists(
    st.sampled_from(["a", "b.", "Xy", " ", "  ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n", "'s", "12", "!!", "é", "\u00a0",
                     "\u3000", "中", ".\n", "x\ny", "?\nZ"]),
    max_size=80,
).map("".join)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(pieces_of_text, st.sampled_from(["gpt2", "gpt4"]))
def test_cut_documents_encode_as_whole_ones(gpt2, tmp_path_factory, text, pattern):
    """Cutting at SAFE_CUT newlines changes no chunk of either built-in split pattern."""
    tokenizer = BPETokenizer(gpt2.ranks, gpt2.special_tokens, pattern)
    path = tmp_path_factory.getbasetemp() / f"cut-{pattern}.txt"
    path.write_bytes(text.encode())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "PIECE_BYTES", 3)
        parts = list(P.text_pieces(path, "strict", cut=True))
    assert "".join(t for t, _, _ in parts) == text and [last for _, _, last in parts] == [False] * (len(parts) - 1) + [True]
    assert sum(n for _, n, _ in parts) == len(text.encode())
    assert sum((tokenizer.encode_ordinary(t) for t, _, _ in parts), []) == tokenizer.encode_ordinary(text)


@settings(max_examples=150, deadline=None)
@given(pieces_of_text, st.sampled_from(["gpt2", "gpt4"]), st.integers(0, 80))
def test_text_cut_at_last_safe_cut_encodes_as_whole(gpt2, text, pattern, at):
    """eval's cut of a str (`last_safe_cut`, any non-space neighbours) changes no chunk either."""
    from npgpt.tokenizer.base import last_safe_cut

    tokenizer = BPETokenizer(gpt2.ranks, gpt2.special_tokens, pattern)
    cut = last_safe_cut(text[:at])
    assert cut == 0 or (text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace())
    assert tokenizer.encode_ordinary(text[:cut]) + tokenizer.encode_ordinary(text[cut:]) == tokenizer.encode_ordinary(text)


# -- a small corpus, every input kind --------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Documents as .txt files in nested folders, .jsonl lines, and one long .txt file."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    lines = [line for line in data_path("corpora/tinyshakespeare.txt").read_text("utf-8").split("\n") if line]
    docs = ["\n".join(rng.choice(lines, int(rng.integers(1, 40)))) + "\n" for _ in range(30)]
    (root / "a" / "b").mkdir(parents=True)
    for i, doc in enumerate(docs[:10]):
        (root / "a" / ("b" if i % 2 else "") / f"doc{i:02d}.txt").write_text(doc, "utf-8")
    with open(root / "a" / "lines.jsonl", "w") as f:
        for doc in docs[10:29]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    (root / "a" / "long.txt").write_text(docs[29] * 40 + "  \n end \n", "utf-8")
    (root / "a" / "ignored.md").write_text("not read")
    # find_sources order: sorted paths below the folder
    order = sorted(p for p in (root / "a").rglob("*") if p.suffix in (".txt", ".jsonl"))
    documents = []
    for path in order:
        if path.suffix == ".jsonl":
            documents += [json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()]
        else:
            documents.append(path.read_text("utf-8"))
    return root / "a", documents


def test_prepared_ids_equal_encoding_each_document(gpt2, gpt2_dir, small_corpus, tmp_path, monkeypatch):
    folder, documents = small_corpus
    monkeypatch.setattr(P, "PIECE_BYTES", 4096)  # cut long.txt into many pieces
    monkeypatch.setattr(P, "TASK_BYTES", 8192)
    meta = P.prepare([folder], tmp_path / "out", str(gpt2_dir), val_fraction=0.3, seed=5, workers=2)
    expected = expected_splits(gpt2, documents, 5, 0.3)
    assert expected["val"] and expected["train"]
    for split in P.SPLITS:
        assert read_split(tmp_path / "out", split) == expected[split]
        assert meta["splits"][split]["tokens"] == len(expected[split])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(documents)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eot_id"] == 50256
    assert meta["tokenizer"]["fingerprint"] == P.fingerprint(gpt2)
    assert isinstance(P.split_tokens_of(tmp_path / "out", "train"), np.memmap)
    assert P.fingerprint(load(tmp_path / "out" / P.TOKENIZER_DIR)) == P.fingerprint(gpt2)


def test_fingerprint_is_the_vocabulary_not_the_file_form(gpt2, tmp_path):
    assert P.fingerprint(load(data_path("gpt2"))) == P.fingerprint(gpt2)
    assert P.fingerprint(BPETokenizer(gpt2.ranks, gpt2.special_tokens, "gpt4")) != P.fingerprint(gpt2)
    assert P.fingerprint(CharTokenizer("ab")) != P.fingerprint(CharTokenizer("abc"))


def test_glob_and_files_and_bpe_training_in_the_same_command(small_corpus, tmp_path):
    folder, _ = small_corpus
    result = cli(str(folder) + "/**/*.txt", folder / "lines.jsonl", "--tokenizer", "bpe:300", "--out", tmp_path / "o",
                 "--workers", "1", "--sample-mb", "0.05")  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = P.open_prepared(tmp_path / "o")
    tokenizer = load(tmp_path / "o" / P.TOKENIZER_DIR)
    assert meta["tokenizer"]["n_vocab"] == tokenizer.n_vocab == 300 and tokenizer.eot_id is not None
    assert len(meta["sources"]) == 12 and "prepare:" in result.stderr and "MB/s" in result.stderr


# -- re-runs, kills, bad input ----------------------------------------------------------------
def test_rerun_is_a_no_op_until_an_input_changes(gpt2_dir, small_corpus, tmp_path):
    folder, _ = small_corpus
    out = tmp_path / "out"
    P.prepare([folder / "lines.jsonl"], out, str(gpt2_dir), workers=1)
    before = (out / "train.bin").stat().st_mtime_ns, (out / P.META_FILE).stat().st_mtime_ns
    P.prepare([folder / "lines.jsonl"], out, str(gpt2_dir), workers=1)
    assert ((out / "train.bin").stat().st_mtime_ns, (out / P.META_FILE).stat().st_mtime_ns) == before
    P.prepare([folder / "lines.jsonl"], out, str(gpt2_dir), workers=1, seed=2)  # a setting changed
    assert (out / P.META_FILE).stat().st_mtime_ns != before[1]


def test_a_failed_write_leaves_no_complete_looking_folder(gpt2_dir, small_corpus, tmp_path, monkeypatch):
    folder, _ = small_corpus
    out = tmp_path / "out"
    P.prepare([folder / "lines.jsonl"], out, str(gpt2_dir), workers=1)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P.os, "fsync", full)
    with pytest.raises(P.PrepareError, match="the disk is full"):
        P.prepare([folder], out, str(gpt2_dir), workers=1)
    with pytest.raises(P.PrepareError, match="not a complete prepared folder"):
        P.open_prepared(out)
    assert not list(out.glob(".prepare.*"))


def counting_encoder(monkeypatch, stop_at=None, error=KeyboardInterrupt):
    """Count the tasks prepare encodes (one worker: in this process); raise `error` at
    task number `stop_at`."""
    calls, real = [], P.encode_task

    def encode(task):
        calls.append(len(task))
        if len(calls) == stop_at:
            raise error
        return real(task)

    monkeypatch.setattr(P, "encode_task", encode)
    return calls


@pytest.fixture
def small_tasks(monkeypatch):
    monkeypatch.setattr(P, "PIECE_BYTES", 4096)
    monkeypatch.setattr(P, "TASK_BYTES", 4096)  # the small corpus in ~20 tasks
    monkeypatch.setattr(P, "RESUME_EVERY_S", 0.0)  # a resume record after every task


def test_an_interrupted_prepare_resumes_from_its_last_record(gpt2_dir, small_corpus, tmp_path, monkeypatch, small_tasks):
    """Ctrl-C at task 6: the partial folder stays, recording 5 tasks done. The same command
    then encodes only the tasks after them (tokens written after the record are cut off),
    and its folder equals an uninterrupted run's, byte for byte."""
    folder, _ = small_corpus
    calls = counting_encoder(monkeypatch)
    whole = P.prepare([folder], tmp_path / "whole", str(gpt2_dir), val_fraction=0.3, workers=1)
    total = len(calls)
    assert total >= 10
    out = tmp_path / "out"
    counting_encoder(monkeypatch, stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([folder], out, str(gpt2_dir), val_fraction=0.3, workers=1)
    (partial,) = out.glob(".prepare.*")
    assert not (out / P.META_FILE).exists()
    assert json.loads((partial / P.RESUME_FILE).read_text("utf-8"))["tasks"] == 5
    with open(partial / "train.bin", "ab") as f:
        f.write(b"\xff\xff" * 7)  # tokens written after the last record (as by a run killed between records)
    calls = counting_encoder(monkeypatch)
    meta = P.prepare([folder], out, str(gpt2_dir), val_fraction=0.3, workers=1)
    assert len(calls) == total - 5
    for split in P.SPLITS:
        assert (out / f"{split}.bin").read_bytes() == (tmp_path / "whole" / f"{split}.bin").read_bytes()
    assert meta["splits"] == whole["splits"] and P.open_prepared(out) == meta
    assert not list(out.glob(".prepare.*"))


def test_another_command_discards_a_stopped_runs_work(gpt2_dir, small_corpus, tmp_path, monkeypatch, small_tasks):
    folder, _ = small_corpus
    out = tmp_path / "out"
    counting_encoder(monkeypatch, stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([folder], out, str(gpt2_dir), val_fraction=0.3, workers=1)
    calls = counting_encoder(monkeypatch)
    P.prepare([folder], out, str(gpt2_dir), val_fraction=0.3, seed=2, workers=1)  # another seed: other splits
    full = len(calls)
    calls.clear()
    P.prepare([folder], tmp_path / "fresh", str(gpt2_dir), val_fraction=0.3, seed=2, workers=1)
    assert full == len(calls)  # nothing was taken from the stopped run
    assert (out / "val.bin").read_bytes() == (tmp_path / "fresh" / "val.bin").read_bytes()
    assert not list(out.glob(".prepare.*"))


def test_a_full_disk_keeps_the_work_for_the_next_run(gpt2_dir, small_corpus, tmp_path, monkeypatch, small_tasks):
    folder, _ = small_corpus
    calls = counting_encoder(monkeypatch)
    P.prepare([folder], tmp_path / "whole", str(gpt2_dir), workers=1)
    total = len(calls)
    out = tmp_path / "out"
    counting_encoder(monkeypatch, stop_at=4, error=OSError(28, "No space left on device"))
    with pytest.raises(P.PrepareError, match=r"the disk is full; free space and run the same command again \(it resumes from the [\d.,]+ MB done\)"):
        P.prepare([folder], out, str(gpt2_dir), workers=1)
    assert len(list(out.glob(".prepare.*"))) == 1
    calls = counting_encoder(monkeypatch)
    P.prepare([folder], out, str(gpt2_dir), workers=1)
    assert len(calls) == total - 3 and not list(out.glob(".prepare.*"))
    assert (out / "train.bin").read_bytes() == (tmp_path / "whole" / "train.bin").read_bytes()


def bad_run(tmp_path, *args):
    result = cli(*args, "--out", tmp_path / "bad", "--workers", "1")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr
    assert not (tmp_path / "bad" / P.META_FILE).exists()
    return lines[-1]


def test_bad_input_gets_one_clear_line(gpt2_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\nworld \xff\xfe and more")
    message = bad_run(tmp_path, bad, "--tokenizer", gpt2_dir)
    assert str(bad) in message and "byte offset 12" in message and "--errors replace" in message
    assert cli(bad, "--tokenizer", gpt2_dir, "--out", tmp_path / "ok", "--errors", "replace").returncode == 0
    assert "no such file" in bad_run(tmp_path, tmp_path / "missing.txt", "--tokenizer", gpt2_dir)
    assert "no file matches" in bad_run(tmp_path, str(tmp_path / "*.nothing"), "--tokenizer", gpt2_dir)
    (tmp_path / "empty.txt").write_text("")
    message = bad_run(tmp_path, tmp_path / "empty.txt", "--tokenizer", gpt2_dir)
    assert "no text" in message
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    assert "--text-field" in bad_run(tmp_path, tmp_path / "x.jsonl", "--tokenizer", gpt2_dir)
    assert "bpe:N" in bad_run(tmp_path, tmp_path / "x.jsonl", "--tokenizer", "no-such-tokenizer")
    big = save(BPETokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 70_000}), tmp_path / "big")
    (tmp_path / "t.txt").write_text("some text")
    assert "--dtype uint32" in bad_run(tmp_path, tmp_path / "t.txt", "--tokenizer", big, "--dtype", "uint16")
    result = cli(tmp_path / "t.txt", "--tokenizer", big, "--out", tmp_path / "wide", "--workers", "1")
    assert result.returncode == 0 and P.open_prepared(tmp_path / "wide")["dtype"] == "uint32"
    assert read_split(tmp_path / "wide", "train") == list(b"some text") + [70_000]


def test_unreadable_input_is_named(tmp_path, monkeypatch):
    """(Permissions cannot be taken from root, so the permission check is what is faked.)"""
    (tmp_path / "a.txt").write_text("text")
    monkeypatch.setattr(P.os, "access", lambda path, mode: False)
    with pytest.raises(P.PrepareError, match=r"a\.txt: not readable"):
        P.find_sources([str(tmp_path)])


# -- training and evaluation read the folders ---------------------------------------------------
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--warmup-iters", "2", "--log-interval", "1", "--eval-iters", "2"]  # fmt: skip


def test_train_and_eval_read_a_prepared_folder(gpt2_dir, small_corpus, tmp_path, capsys):
    from npgpt import eval as npgpt_eval
    from npgpt import train

    folder, _ = small_corpus
    data = tmp_path / "data"
    P.prepare([folder], data, str(gpt2_dir), val_fraction=0.3, workers=1)
    assert train.main(["--data", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--max-iters", "2"]) == 0
    assert train.main(["--data", str(data), "--out-dir", str(tmp_path / "run"), "--resume", "--max-iters", "3"]) == 0
    assert P.fingerprint(load(tmp_path / "run")) == P.open_prepared(data)["tokenizer"]["fingerprint"]
    assert npgpt_eval.main(["--weights", str(tmp_path / "run"), "--data", str(data), "--max-tokens", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens_evaluated"] == 49
    # a model with another tokenizer: one clear error, in both
    text = tmp_path / "t.txt"
    text.write_text("abc " * 50)
    assert train.main(["--data", str(text), "--out-dir", str(tmp_path / "char"), *TINY, "--max-iters", "1", "--tokenizer", "char"]) == 0
    capsys.readouterr()
    assert npgpt_eval.main(["--weights", str(tmp_path / "char"), "--data", str(data)]) == 1
    assert "prepared with a different tokenizer" in capsys.readouterr().err
    assert train.main(["--data", str(data), "--out-dir", str(tmp_path / "tuned"), "--init-from", str(tmp_path / "char"), *TINY]) == 1
    assert "prepared with a different tokenizer" in capsys.readouterr().err


# -- a generated corpus of >= 100 MB --------------------------------------------------------------
BIG_BYTES = 100_000_000


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory):
    """>= 100 MB of Shakespeare's lines drawn at random: .jsonl files of documents, .txt
    documents in nested folders, and one 5 MB .txt document (cut into pieces)."""
    root = tmp_path_factory.mktemp("big") / "corpus"
    lines = np.array([line for line in data_path("corpora/tinyshakespeare.txt").read_text("utf-8").split("\n") if line], dtype=object)
    rng = np.random.default_rng(0)
    size, n = 0, 0

    def document(n_lines):
        return "\n".join(lines[rng.integers(0, len(lines), n_lines)]) + "\n"

    (root / "books" / "more").mkdir(parents=True)
    big = document(150_000)
    (root / "0-big-book.txt").write_text(big, "utf-8")  # the first document (sources are sorted)
    size += len(big)
    while size < BIG_BYTES:
        if n % 5 == 0:
            docs = [document(int(rng.integers(20, 1000))) for _ in range(200)]
            with open(root / f"part{n:03d}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
            size += sum(map(len, docs))
        else:
            doc = document(int(rng.integers(5_000, 30_000)))
            (root / "books" / ("more" if n % 2 else "") / f"book{n:03d}.txt").write_text(doc, "utf-8")
            size += len(doc)
        n += 1
    return root


@pytest.fixture(scope="session")
def big_prepared(big_corpus, tmp_path_factory):
    """The big corpus prepared with 1 and with 2 workers: the two output folders.

    Speed is not judged here (a test's wall time says more about the machine than about
    npgpt); `python tools/bench.py prepare` measures the 1 -> 2 worker speed-up."""
    tokenizer_dir = save(load(data_path("gpt2/gpt2.tiktoken")), tmp_path_factory.mktemp("tok"))
    root = tmp_path_factory.mktemp("prepared")
    runs = {}
    for workers in (1, 2):
        result = cli(big_corpus, "--tokenizer", tokenizer_dir, "--out", root / f"w{workers}", "--workers", workers)
        assert result.returncode == 0, result.stderr
        runs[workers] = root / f"w{workers}"
    return runs, tokenizer_dir


def test_big_corpus_prepares_id_for_id_with_one_or_two_workers(big_prepared):
    """Splitting the work over processes changes nothing in the output files."""
    runs, _ = big_prepared
    one, two = runs[1], runs[2]
    meta = P.open_prepared(two)
    assert meta["bytes"] >= BIG_BYTES and meta["splits"]["val"]["documents"] >= 1
    for split in P.SPLITS:
        assert (one / f"{split}.bin").read_bytes() == (two / f"{split}.bin").read_bytes()


def test_big_corpus_one_worker_equals_encoding_each_document(big_corpus, big_prepared):
    """Spot check against the tokenizer itself: the 5 MB .txt document (cut into pieces)
    is the first document, so its ids open its split."""
    runs, tokenizer_dir = big_prepared
    tokenizer = load(tokenizer_dir)
    sources = P.find_sources([str(big_corpus)])
    assert sources[0].name == "0-big-book.txt"
    documents = [sources[0].read_text("utf-8")]
    expected = expected_splits(tokenizer, documents, 1337, 0.0005)
    split = "val" if expected["val"] else "train"
    tokens = P.split_tokens_of(runs[1], split)
    assert tokens[: len(expected[split])].tolist() == expected[split]


def test_big_corpus_rerun_is_a_no_op(big_corpus, big_prepared):
    runs, tokenizer_dir = big_prepared
    folder = runs[2]
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    result = cli(big_corpus, "--tokenizer", tokenizer_dir, "--out", folder, "--workers", 2)
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before


def test_killed_prepare_leaves_nothing_that_reads_as_complete(big_corpus, big_prepared, tmp_path):
    import shutil
    import signal
    import time

    runs, tokenizer_dir = big_prepared
    out = tmp_path / "out"
    shutil.copytree(runs[1], out)  # a complete folder, which the killed run starts to replace
    args = [sys.executable, "-m", "npgpt.data", "prepare", str(big_corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--workers", "1", "--seed", "9"]  # fmt: skip
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "prepare:" not in seen:  # wait until encoding has begun
        seen += process.stderr.read(1) or pytest.fail(f"prepare ended before it was killed: {seen}")
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(P.PrepareError, match="not a complete prepared folder"):
        P.open_prepared(out)
    from npgpt import train

    with pytest.raises(P.PrepareError, match="not a complete prepared folder"):
        train.load_splits(load(tokenizer_dir), out, 0.1)


def test_a_killed_prepare_resumes_id_for_id(big_corpus, big_prepared, tmp_path):
    """SIGKILL once the run has made a resume record; the same command (on 2 workers: the
    worker count is not part of it) resumes, and its files equal an uninterrupted run's."""
    import signal
    import time

    runs, tokenizer_dir = big_prepared
    out = tmp_path / "out"
    args = [sys.executable, "-m", "npgpt.data", "prepare", str(big_corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--workers", "1"]  # fmt: skip
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob(f".prepare.*/{P.RESUME_FILE}")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("prepare made no resume record before it ended")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / P.META_FILE).exists()
    result = cli(big_corpus, "--tokenizer", tokenizer_dir, "--out", out, "--workers", 2)
    assert result.returncode == 0 and "resuming a stopped run" in result.stderr, result.stderr
    for split in P.SPLITS:
        assert (out / f"{split}.bin").read_bytes() == (runs[1] / f"{split}.bin").read_bytes()
    assert not list(out.glob(".prepare.*"))


RSS_PROBE = """
import sys
from npgpt import train
code = train.main(sys.argv[1:])
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])  # peak RSS, kB
sys.exit(code)
"""  # (not getrusage: its ru_maxrss survives fork + exec, so it may report the parent's peak)


def test_training_from_the_big_corpus_keeps_rss_flat(big_prepared, small_corpus, tmp_path):
    """Peak RSS training on 100 MB of text (memory-mapped) minus that on a small folder."""
    runs, tokenizer_dir = big_prepared
    small = tmp_path / "small"
    P.prepare([small_corpus[0]], small, str(tokenizer_dir), val_fraction=0.3, workers=1)
    peaks = {}
    for name, data in (("small", small), ("big", runs[2])):
        args = ["--data", str(data), "--out-dir", str(tmp_path / f"run-{name}"), *TINY, "--max-iters", "20", "--eval-interval", "10"]
        result = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        peaks[name] = int(result.stdout.split()[-1]) * 1024
    assert peaks["big"] - peaks["small"] < 300e6, peaks
