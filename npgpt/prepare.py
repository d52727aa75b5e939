"""Tokenize a corpus once into memory-mapped token files: `python -m npgpt.data prepare`.

    python -m npgpt.data prepare INPUT... --tokenizer DIR|NAME|bpe:N --out DIR

INPUT: files, folders (every .txt and .jsonl below them) and globs. A .txt file is one
document; each line of a .jsonl file is one (its `--text-field`). Documents are encoded
as ordinary text (a literal "<|endoftext|>" in a document is text) and each is followed
by the tokenizer's end-of-text id, when it has one. Whole documents go to train or val,
chosen from (seed, document number) alone.

The prepared folder:

    train.bin, val.bin   the tokens, raw little-endian `dtype` (uint16 when the vocabulary
                         has at most 65,536 ids, else uint32), read with np.memmap
    tokenizer/           the tokenizer's files (as `npgpt.tokenizer.save` writes them)
    meta.json            written last: format, version, dtype, tokenizer (fingerprint,
                         n_vocab, eot_id), splits (file, tokens, documents), val_fraction,
                         seed, text_field, errors, dtype_requested, trained_tokenizer (bpe:N
                         and sample_mb, or null), bytes, sources (path, size, mtime_ns)

The fingerprint is the sha256 of the tokenizer's saved files (`fingerprint`). Every file
is written to a temp name, fsynced and renamed; meta.json is removed first and written
last, so a folder whose meta.json is present is complete, and a killed run leaves none.
Running again with unchanged inputs, settings and tokenizer does nothing.

A run in progress works in a hidden `.prepare.*` folder inside --out and, every
RESUME_EVERY_S seconds, fsyncs its token files and records how far it got (resume.json).
A run that was killed, interrupted or stopped by a full disk leaves that folder; the same
command again resumes from its last record (the tokens after it are cut off and encoded
again), so at most a few seconds of work are lost. Another command (other inputs,
settings or tokenizer) discards it and starts afresh.

Work is spread over `--workers` processes (spawned), each encoding batches of documents.
Documents longer than about 1 MB are cut into pieces at newlines that sit between two
printable ASCII characters, which changes no chunk of GPT-2's or GPT-4's split pattern, so
the ids equal those of encoding each document whole (other patterns: documents stay whole).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.errors import UserError, add_debug_flag, run_cli
from npgpt.tokenizer.base import SAFE_CUT

META_FILE, TOKENIZER_DIR = "meta.json", "tokenizer"
SPLITS = ("train", "val")
FORMAT, VERSION = "npgpt-tokens", 1
PIECE_BYTES = 1 << 20  # long documents are cut into pieces of about this many bytes
TASK_BYTES = 1 << 20  # text per batch sent to a worker
RESUME_FILE = "resume.json"  # in a run's partial folder: how far it got
RESUME_EVERY_S = 5.0  # seconds between resume records: the most work a killed run loses


class PrepareError(UserError, RuntimeError):
    """Bad input or a failed write; the message says what is wrong and what to do."""


# -- tokenizers ----------------------------------------------------------------------------
def fingerprint(tokenizer) -> str:
    """sha256 of the files `npgpt.tokenizer.save` writes in its default form: equal for the
    same vocabulary, pattern and special tokens, whichever file form it was loaded from."""
    from npgpt.tokenizer import save

    with tempfile.TemporaryDirectory() as tmp:
        save(tokenizer, tmp)
        digest = hashlib.sha256()
        for file in sorted(Path(tmp).iterdir()):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def token_dtype(n_vocab: int, requested: str = "auto") -> np.dtype:
    """The smallest unsigned dtype holding ids 0..n_vocab-1 ("auto"), or the one requested."""
    limits = {"uint16": 2**16, "uint32": 2**32}
    name = requested if requested != "auto" else ("uint16" if n_vocab <= limits["uint16"] else "uint32")
    if n_vocab > limits[name]:
        raise PrepareError(f"--dtype {name} holds {limits[name]:,} ids but the tokenizer has {n_vocab:,}; use --dtype uint32 or auto")
    return np.dtype(name).newbyteorder("<")


def resolve_tokenizer(spec: str, sample=None):
    """A tokenizer folder or .tiktoken file, a weights NAME (weights/NAME/), or bpe:N (trained
    on `sample()`, a function returning text, with <|endoftext|> as a special token)."""
    from npgpt.tokenizer import ENDOFTEXT, load, train_bpe

    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec[4:])
        except ValueError:
            raise PrepareError(f"--tokenizer {spec!r}: N in bpe:N must be an integer, e.g. bpe:4096") from None
        text = sample()
        say(f"training a {vocab_size}-token BPE on {len(text.encode('utf-8')) / 1e6:.1f} MB of the corpus")
        return train_bpe(text, vocab_size, special_tokens=(ENDOFTEXT,))
    path = Path(spec).expanduser()
    if not path.exists() and len(path.parts) == 1:
        from npgpt.weights import WeightsError, resolve_weights

        try:
            path = resolve_weights(spec).parent
        except WeightsError:
            raise PrepareError(f"--tokenizer {spec!r} is no tokenizer folder, weights name (weights/{spec}/) or bpe:N; "
                               "give one, e.g. ../shared/data/gpt2 or bpe:4096") from None  # fmt: skip
    try:
        return load(path)
    except (OSError, ValueError) as e:
        raise PrepareError(f"--tokenizer {spec}: {e}") from None


# -- reading the corpus --------------------------------------------------------------------
@dataclass
class Piece:
    text: str
    nbytes: int  # bytes of the input file it was read from
    document: int  # number of the document, counted over all inputs
    last: bool  # the document's last piece


def find_sources(inputs: list[str]) -> list[Path]:
    """Every input file: files as given, .txt/.jsonl files below folders, glob matches."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not matches:
                raise PrepareError(f"{spec}: the folder holds no .txt or .jsonl file; point at the text files")
        elif path.exists():
            matches = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            if not matches:
                raise PrepareError(f"{spec}: no file matches this pattern")
        else:
            raise PrepareError(f"{spec}: no such file or folder")
        found += matches
    for path in found:
        if not os.access(path, os.R_OK):
            raise PrepareError(f"{path}: not readable (permission denied); fix its permissions or leave it out")
    return list(dict.fromkeys(p.resolve() for p in found))


def decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: invalid UTF-8 at byte offset {offset + e.start:,} ({data[e.start:e.start + 4]!r}); "
                           "fix the file, or pass --errors replace to read such bytes as U+FFFD") from None  # fmt: skip


def text_pieces(path: Path, errors: str, cut: bool):
    """(text, bytes read, is_last) pieces of one .txt file, cut at safe newlines when `cut`."""
    carry, offset = b"", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            data = carry + block
            if not block:
                if data or offset == 0:
                    yield decode(data, path, offset, errors), len(data), True
                return
            found = None
            if cut:
                for found in SAFE_CUT.finditer(data, max(0, len(data) - PIECE_BYTES - 2)):
                    pass
            if found is None:
                carry = data
                continue
            end = found.start() + 2
            yield decode(data[:end], path, offset, errors), end, False
            carry, offset = data[end:], offset + end


def jsonl_documents(path: Path, errors: str, field: str):
    """(text, bytes read) per document of a .jsonl file (blank lines skipped)."""
    offset = done = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            text = decode(line, path, offset, errors)
            offset += len(line)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                document = record[field]
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{number}: not a JSON line ({e.msg}); fix the line or remove it") from None
            except (KeyError, TypeError):
                raise PrepareError(f"{path}:{number}: no {field!r} field; name the text's field with --text-field") from None
            if not isinstance(document, str):
                raise PrepareError(f"{path}:{number}: the {field!r} field is {type(document).__name__}, not text")
            yield document, offset - done
            done = offset


def pieces(sources: list[Path], errors: str, field: str, cut: bool):
    """Every Piece of the corpus, in order; empty files are skipped with a warning."""
    document = 0
    for path in sources:
        if path.stat().st_size == 0:
            say(f"warning: {path} is empty; skipped")
            continue
        try:
            if path.suffix == ".jsonl":
                for text, nbytes in jsonl_documents(path, errors, field):
                    yield Piece(text, nbytes, document, True)
                    document += 1
            else:
                for text, nbytes, last in text_pieces(path, errors, cut):
                    yield Piece(text, nbytes, document, last)
                document += 1
        except OSError as e:
            raise PrepareError(f"{path}: cannot be read ({e.strerror}); fix it or leave it out") from None


def sample_text(sources: list[Path], errors: str, field: str, max_bytes: int) -> str:
    """The corpus's first `max_bytes` (about) of text, for training a tokenizer."""
    texts, size = [], 0
    for piece in pieces(sources, errors, field, cut=True):
        texts.append(piece.text)
        size += piece.nbytes
        if size >= max_bytes:
            break
    return "\n".join(texts)


def is_val(seed: int, document: int, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a hash of (seed, document)."""
    digest = hashlib.blake2b(f"{seed}:{document}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


# -- encoding, in worker processes ---------------------------------------------------------
_worker: dict = {}


def init_worker(tokenizer_dir: str, dtype: str):
    from npgpt.tokenizer import load

    _worker.update(tokenizer=load(tokenizer_dir), dtype=np.dtype(dtype))


def encode_task(task: list[tuple[str, bool, bool]]) -> tuple[bytes, bytes]:
    """(train bytes, val bytes) of a batch of (text, is_val, ends_document) pieces."""
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    eot = tokenizer.eot_id
    ids: tuple[list[int], list[int]] = ([], [])
    for text, val, ends in task:
        out = ids[val]
        out += tokenizer.encode_ordinary(text)
        if ends and eot is not None:
            out.append(eot)
    return np.asarray(ids[0], dtype).tobytes(), np.asarray(ids[1], dtype).tobytes()


def tasks(stream, seed: int, val_fraction: float, counts: dict):
    """(batch, input bytes) for batches of about TASK_BYTES of pieces; counts documents per
    split in `counts`."""
    batch, size = [], 0
    for piece in stream:
        val = is_val(seed, piece.document, val_fraction)
        batch.append((piece.text, val, piece.last))
        size += piece.nbytes
        if piece.last:
            counts[SPLITS[val]] += 1
        if size >= TASK_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def encoded(task_stream, workers: int, tokenizer_dir: str, dtype: str):
    """(train bytes, val bytes, input bytes) per task, in order: in this process for one
    worker, else in spawned worker processes with at most 2 tasks per worker in flight."""
    if workers == 1:
        init_worker(tokenizer_dir, dtype)
        for task, size in task_stream:
            yield (*encode_task(task), size)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=init_worker, initargs=(tokenizer_dir, dtype)) as pool:
        pending: deque = deque()
        try:
            for task, size in task_stream:
                pending.append((pool.submit(encode_task, task), size))
                if len(pending) >= 2 * workers:
                    future, done = pending.popleft()
                    yield (*future.result(), done)
            while pending:
                future, done = pending.popleft()
                yield (*future.result(), done)
        except BrokenProcessPool:
            raise PrepareError("a worker process died (out of memory, or killed); run again, perhaps with fewer --workers") from None
        finally:
            for future, _ in pending:
                future.cancel()


# -- the prepared folder -------------------------------------------------------------------
def source_records(sources: list[Path]) -> list[dict]:
    return [{"path": str(p), "size": (s := p.stat()).st_size, "mtime_ns": s.st_mtime_ns} for p in sources]


def write_atomic(path: Path, data: bytes):
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def up_to_date(out: Path, settings: dict, sources: list[dict], tokenizer_fingerprint: str | None) -> bool:
    """Whether `out` is complete and was made from these sources, settings and tokenizer
    (None: a tokenizer trained by bpe:N, which the settings and sources determine)."""
    meta = read_meta(out)
    if not meta or meta.get("sources") != sources or any(meta.get(k) != v for k, v in settings.items()):
        return False
    if tokenizer_fingerprint and meta["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        return False
    try:
        open_prepared(out)
    except PrepareError:
        return False
    return True


def resumable(out: Path, key: dict) -> tuple[Path, dict] | None:
    """A killed run's partial folder in `out` made with the same `key` (inputs, settings,
    tokenizer) and its last resume record, whose token files hold at least what it
    records; None if there is none."""
    for folder in sorted(out.glob(".prepare.*")):
        try:
            record = json.loads((folder / RESUME_FILE).read_text("utf-8"))
            if record.get("key") == key and all((folder / f"{s}.bin").stat().st_size >= record["bytes"][s] for s in SPLITS):
                return folder, record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def prepare(inputs, out, tokenizer_spec, *, val_fraction=0.0005, seed=1337, text_field="text", errors="strict",
            workers=None, dtype="auto", sample_mb=10.0) -> dict:  # fmt: skip
    """Prepare `out` from `inputs` (see the module docstring); returns its metadata."""
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    workers = workers or len(os.sched_getaffinity(0))
    sources = find_sources(inputs)
    records = source_records(sources)
    out = Path(out)
    settings = {"val_fraction": val_fraction, "seed": seed, "text_field": text_field, "errors": errors, "dtype_requested": dtype,
                "trained_tokenizer": {"spec": tokenizer_spec, "sample_mb": sample_mb} if tokenizer_spec.startswith("bpe:") else None}  # fmt: skip
    tokenizer = None if settings["trained_tokenizer"] else resolve_tokenizer(tokenizer_spec)
    known_fingerprint = tokenizer and fingerprint(tokenizer)
    if up_to_date(out, settings, records, known_fingerprint):
        say(f"{out} is up to date ({len(sources)} unchanged sources, same settings): nothing to do")
        return read_meta(out)
    key = {"format": FORMAT, "version": VERSION, **settings, "sources": records, "tokenizer": known_fingerprint,
           "piece_bytes": PIECE_BYTES, "task_bytes": TASK_BYTES}  # fmt: skip
    from npgpt.tokenizer import load, save
    from npgpt.tokenizer.bpe import PATTERNS, BPETokenizer

    total = sum(r["size"] for r in records)
    found = resumable(out, key)
    if found and tokenizer is None:  # bpe:N: the tokenizer the stopped run trained
        try:
            tokenizer = load(found[0] / TOKENIZER_DIR)
        except (OSError, ValueError, UserError):
            found = None
    tmp, record = found or (None, None)
    tokenizer = tokenizer or resolve_tokenizer(tokenizer_spec, lambda: sample_text(sources, errors, text_field, int(sample_mb * 1e6)))
    token_type = token_dtype(tokenizer.n_vocab, dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # from here on the folder is incomplete
    for stale in out.glob(".prepare.*"):  # what a killed run of another command left
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    if record is not None:
        say(f"resuming a stopped run of this command: {record['input_bytes'] / 1e6:,.1f} of "
            f"{total / 1e6:,.1f} MB were done")  # fmt: skip
    else:
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".prepare."))
    cut = not isinstance(tokenizer, BPETokenizer) or tokenizer.pattern in PATTERNS.values()
    counts = {"train": 0, "val": 0}
    complete = False
    try:
        if record is None:
            save(tokenizer, tmp / TOKENIZER_DIR)
        mode = "wb" if record is None else "r+b"
        with open(tmp / "train.bin", mode) as train_file, open(tmp / "val.bin", mode) as val_file:
            done = 0 if record is None else record["tasks"]
            if record is not None:  # what was written after the last record is encoded again
                for split, f in zip(SPLITS, (train_file, val_file)):
                    f.truncate(record["bytes"][split])
                    f.seek(0, os.SEEK_END)
            progress = Progress(total, *((0, 0) if record is None else (record["input_bytes"], record["tokens"])))
            stream = tasks(pieces(sources, errors, text_field, cut), seed, val_fraction, counts)
            stream = itertools.islice(stream, done, None)  # the recorded tasks are read (for the counts), not encoded
            last = time.perf_counter()
            for train_bytes, val_bytes, size in encoded(stream, workers, str(tmp / TOKENIZER_DIR), token_type.str):
                train_file.write(train_bytes)
                val_file.write(val_bytes)
                done += 1
                progress.update(size, (len(train_bytes) + len(val_bytes)) // token_type.itemsize)
                if time.perf_counter() - last >= RESUME_EVERY_S:
                    last = time.perf_counter()
                    record_progress(tmp, key, done, progress, train_file, val_file)
            for f in (train_file, val_file):
                f.flush()
                os.fsync(f.fileno())
        progress.finish()
        if progress.tokens == 0:
            raise PrepareError("the inputs hold no text; give files with text in them")
        tokens = {split: (tmp / f"{split}.bin").stat().st_size // token_type.itemsize for split in SPLITS}
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        os.replace(tmp / TOKENIZER_DIR, out / TOKENIZER_DIR)
        for split in SPLITS:
            os.replace(tmp / f"{split}.bin", out / f"{split}.bin")
        fsync_dir(out)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": token_type.name,
            "tokenizer": {"fingerprint": known_fingerprint or fingerprint(tokenizer), "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id},
            "splits": {s: {"file": f"{s}.bin", "tokens": tokens[s], "documents": counts[s]} for s in SPLITS},
            **settings, "bytes": total, "sources": records,
        }  # fmt: skip
        write_atomic(out / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        fsync_dir(out)
        complete = True
    except OSError as e:
        what = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
        try:
            mb = json.loads((tmp / RESUME_FILE).read_text("utf-8"))["input_bytes"] / 1e6
            again = f"free space and run the same command again (it resumes from the {mb:,.1f} MB done), or choose another --out"
        except (OSError, ValueError, KeyError):
            again = "free space (or choose another --out) and run again"
        raise PrepareError(f"writing {out} failed: {what}; {again}") from None
    finally:
        if complete or not (tmp / RESUME_FILE).exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if val_fraction > 0 and counts["val"] == 0:
        say(f"warning: the val split is empty ({counts['train']} documents, none drawn for val); "
            "give more documents or a larger --val-fraction")  # fmt: skip
    return meta


def record_progress(tmp: Path, key: dict, tasks_done: int, progress, train_file, val_file):
    """Make the token files durable, then record in `tmp` how far the run got: a killed
    run resumes from here."""
    for f in (train_file, val_file):
        f.flush()
        os.fsync(f.fileno())
    record = {"key": key, "tasks": tasks_done, "bytes": {"train": train_file.tell(), "val": val_file.tell()},
              "input_bytes": progress.done, "tokens": progress.tokens}  # fmt: skip
    write_atomic(tmp / RESUME_FILE, json.dumps(record).encode())


class Progress:
    """One line on stderr, rewritten at most twice a second: MB, MB/s, tokens, ETA (a
    resumed run starts at what was done: its rate counts this run's work only)."""

    def __init__(self, total_bytes: int, done: int = 0, tokens: int = 0):
        self.total, self.done, self.tokens, self.resumed_at = total_bytes, done, tokens, done
        self.start = self.last = time.perf_counter()

    def update(self, nbytes: int, ntokens: int):
        self.done += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        if now - self.last >= 0.5:
            self.last = now
            self.show("\r")

    def show(self, end: str):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.done - self.resumed_at) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(f"{end}prepare: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB | {rate / 1e6:.2f} MB/s | "
              f"{self.tokens:,} tokens | ETA {int(eta) // 60}m{int(eta) % 60:02d}s", end="", file=sys.stderr, flush=True)  # fmt: skip

    def finish(self):
        self.show("\r")
        print(file=sys.stderr, flush=True)


# -- reading a prepared folder ---------------------------------------------------------------
def open_prepared(folder) -> dict:
    """The metadata of a complete prepared folder; PrepareError says what is missing."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise PrepareError(f"{folder} is not a complete prepared folder (no valid {META_FILE}: a prepare run was "
                           "interrupted, or it was never run); run python -m npgpt.data prepare ... --out "
                           f"{folder}")  # fmt: skip
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        file = folder / info["file"]
        size = file.stat().st_size if file.exists() else None
        if size != info["tokens"] * itemsize:
            raise PrepareError(f"{file} holds {size} bytes, not the {info['tokens'] * itemsize} its {META_FILE} "
                               f"records; prepare {folder} again")  # fmt: skip
    return meta


def split_tokens_of(folder, split: str) -> np.ndarray:
    """One split of a prepared folder, memory-mapped read-only (empty: an empty array)."""
    folder = Path(folder)
    meta = open_prepared(folder)
    if split not in meta["splits"]:
        raise PrepareError(f"{folder} has no {split!r} split (it has {', '.join(meta['splits'])})")
    info, dtype = meta["splits"][split], np.dtype(meta["dtype"]).newbyteorder("<")
    if info["tokens"] == 0:
        return np.empty(0, dtype)
    return np.memmap(folder / info["file"], dtype=dtype, mode="r", shape=(info["tokens"],))


def check_tokenizer(folder, tokenizer):
    """PrepareError unless `tokenizer` is the one the folder was prepared with."""
    meta = open_prepared(folder)
    if fingerprint(tokenizer) != meta["tokenizer"]["fingerprint"]:
        raise PrepareError(f"{folder} was prepared with a different tokenizer (n_vocab {meta['tokenizer']['n_vocab']:,}) "
                           f"than the model's (n_vocab {tokenizer.n_vocab:,}); prepare the corpus again with "
                           "--tokenizer set to the model's folder")  # fmt: skip


def read_tokens(path, tokenizer, split: str | None = None) -> np.ndarray:
    """The tokens `--data path` means: a prepared folder's `split`, memory-mapped (after
    checking its tokenizer is `tokenizer`), or a UTF-8 text file's ids (`split` None)."""
    path = Path(path)
    if path.is_dir():
        check_tokenizer(path, tokenizer)
        return split_tokens_of(path, split or "train")
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise PrepareError(f"--data {path}: no such file or folder") from None
    except UnicodeDecodeError as e:
        raise PrepareError(f"--data {path}: invalid UTF-8 at byte offset {e.start:,}; fix the file") from None
    ids = tokenizer.encode(text, allowed_special="all")
    return np.asarray(ids, dtype=token_dtype(tokenizer.n_vocab))


# -- command line --------------------------------------------------------------------------
def say(message: str):
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m npgpt.data", description="Training data tools.")
    commands = p.add_subparsers(dest="command", required=True)
    d = commands.add_parser("prepare", help="tokenize a corpus once into memory-mapped token files",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders (.txt and .jsonl inside) or globs")
    d.add_argument("--out", required=True, help="the prepared folder to write")
    d.add_argument("--tokenizer", required=True, help="a tokenizer folder, a weights NAME (e.g. gpt2 for weights/gpt2/), "
                   "or bpe:N to train an N-token BPE on a sample of the corpus")  # fmt: skip
    d.add_argument("--text-field", default="text", help="the text's field in .jsonl lines (default text)")
    d.add_argument("--val-fraction", type=float, default=0.0005, help="fraction of documents held out for validation (default 0.0005)")
    d.add_argument("--seed", type=int, default=1337, help="seeds the train/val draw of documents (default 1337)")
    d.add_argument("--workers", type=int, help="encoding processes (default: the usable cores)")
    d.add_argument("--errors", choices=("strict", "replace"), default="strict", help="invalid UTF-8: stop (strict, default) or read as U+FFFD")
    d.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto", help="token type (default: the smallest that fits)")
    d.add_argument("--sample-mb", type=float, default=10.0, help="MB of the corpus that bpe:N trains on (default 10)")
    add_debug_flag(d)
    return p


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                       text_field=args.text_field, errors=args.errors, workers=args.workers, dtype=args.dtype,
                       sample_mb=args.sample_mb)  # fmt: skip
    except KeyboardInterrupt:
        say(f"interrupted: {args.out} is left incomplete (no {META_FILE}); run the same command again (it resumes "
            f"from the run's last record, where it made one)")  # fmt: skip
        return 130
    splits = meta["splits"]
    say(f"{args.out}: {splits['train']['tokens']:,} train tokens ({splits['train']['documents']:,} documents), "
        f"{splits['val']['tokens']:,} val tokens ({splits['val']['documents']:,} documents), {meta['dtype']}")  # fmt: skip
    return 0
