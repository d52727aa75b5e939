"""Fetch a GPT-2 repository's files from the Hugging Face hub, with a cache and integrity checks.

    listing  GET {endpoint}/api/models/{repo}/tree/{revision}
             -> [{"path", "size", "oid" (git blob SHA-1), "lfs": {"oid" (SHA-256), "size"}}]
    file     GET {endpoint}/{repo}/resolve/{revision}/{path}

Each file is streamed to `<name>.part`, its size and hash checked against the listing
(SHA-256 for LFS files, the git blob SHA-1 otherwise), then renamed into place. The
listing is kept beside the files, so once everything is cached nothing touches the network.
The endpoint is configurable (tests point it at a local server; $HF_ENDPOINT also works).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from npgpt.convert.common import ConversionError

DEFAULT_ENDPOINT = "https://huggingface.co"
LISTING_NAME = ".hub-listing.json"
REQUIRED_FILES = ("config.json", "vocab.json", "merges.txt")
WEIGHT_CHOICES = ("model.safetensors", "pytorch_model.bin")  # first one the repo has
CHUNK_BYTES = 1 << 20
LOCAL_HINT = (
    f"if you are offline, get {', '.join(REQUIRED_FILES)} and {' or '.join(WEIGHT_CHOICES)} "
    "another way and pass their folder instead: tools/convert_gpt2.py PATH/TO/FOLDER --name NAME"
)


class HubError(ConversionError):
    """The hub could not be reached, or a downloaded file is not what the hub listed."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPGPT_CACHE", Path.home() / ".cache" / "npgpt")) / "hub"


def fetch_from_hub(
    repo_id: str,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    revision: str = "main",
    timeout: float = 30.0,
) -> Path:
    """The local folder holding `repo_id`'s config, weights and tokenizer files, downloading
    what the cache lacks. Raises HubError (offline, not found, integrity failure)."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    folder = Path(cache_dir or default_cache_dir()) / repo_id.replace("/", "--") / revision
    listing_path = folder / LISTING_NAME
    if listing_path.exists():
        wanted = json.loads(listing_path.read_text())
        if all(is_cached(folder / name, meta) for name, meta in wanted.items()):
            return folder
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        raise HubError(f"{repo_id!r} is not in the cache {folder} and HF_HUB_OFFLINE=1; {LOCAL_HINT}")
    else:
        wanted = choose_files(repo_id, fetch_listing(endpoint, repo_id, revision, timeout))
    folder.mkdir(parents=True, exist_ok=True)
    for name, meta in wanted.items():
        if not is_cached(folder / name, meta):
            url = f"{endpoint}/{quote(repo_id)}/resolve/{quote(revision)}/{quote(name)}"
            download(url, folder / name, meta, timeout)
    listing_path.write_text(json.dumps(wanted, indent=1, sort_keys=True))
    return folder


def quote(part: str) -> str:
    return urllib.parse.quote(part, safe="/")


def open_url(url: str, timeout: float):
    """urlopen, with network failures turned into a HubError that says what to do instead."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as error:
        hint = " (no such repository, revision or file?)" if error.code in (401, 404) else ""
        raise HubError(f"{url}: HTTP {error.code} {error.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise HubError(f"cannot reach the Hugging Face hub at {url} ({reason}); {LOCAL_HINT}") from None


def fetch_listing(endpoint: str, repo_id: str, revision: str, timeout: float) -> dict[str, dict]:
    """{path: {"size", "sha256" or "sha1"}} of the files at the repo's top level."""
    url = f"{endpoint}/api/models/{quote(repo_id)}/tree/{quote(revision)}"
    with open_url(url, timeout) as response:
        try:
            entries = json.loads(response.read())
        except json.JSONDecodeError:
            raise HubError(f"{url}: the file listing is not JSON") from None
    listing = {}
    for entry in entries:
        if entry.get("type", "file") != "file":
            continue
        lfs = entry.get("lfs")
        if lfs:
            listing[entry["path"]] = {"size": lfs.get("size", entry.get("size")), "sha256": lfs["oid"]}
        else:
            listing[entry["path"]] = {"size": entry.get("size"), "sha1": entry.get("oid")}
    return listing


def choose_files(repo_id: str, listing: dict[str, dict]) -> dict[str, dict]:
    """The files convert() needs: config, tokenizer, and the preferred weights file."""
    missing = [name for name in REQUIRED_FILES if name not in listing]
    weights = next((name for name in WEIGHT_CHOICES if name in listing), None)
    if missing or weights is None:
        raise HubError(f"hub repository {repo_id!r} lacks {missing + ([] if weights else [' or '.join(WEIGHT_CHOICES)])}")
    return {name: listing[name] for name in (*REQUIRED_FILES, weights)}


def is_cached(path: Path, meta: dict) -> bool:
    """Present with the listed size (hashes were checked when it was downloaded)."""
    return path.exists() and (meta.get("size") is None or path.stat().st_size == meta["size"])


def download(url: str, path: Path, meta: dict, timeout: float):
    """Stream `url` to `path` through `<path>.part`, checking size and hash before renaming."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    if meta.get("sha1") and meta.get("size") is not None:
        sha1.update(f"blob {meta['size']}\0".encode())  # git hashes "blob <size>\0" + content
    part = path.with_name(path.name + ".part")
    size, progress = 0, Progress(path.name, meta.get("size"))
    try:
        with open_url(url, timeout) as response, open(part, "wb") as out:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                sha256.update(chunk)
                sha1.update(chunk)
                size += len(chunk)
                progress.update(size)
        progress.finish(size)
        check_integrity(path.name, meta, size, sha256.hexdigest(), sha1.hexdigest())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


class Progress:
    """One stderr line per file, rewritten at most twice a second: MB so far, rate, ETA."""

    def __init__(self, name: str, total: int | None):
        self.name, self.total = name, total
        self.start = self.shown = time.monotonic()

    def update(self, done: int):
        if time.monotonic() - self.shown >= 0.5:
            self.shown = time.monotonic()
            print(f"\r{self.line(done)}", end="", file=sys.stderr, flush=True)

    def finish(self, done: int):
        print(f"\r{self.line(done)}", file=sys.stderr, flush=True)

    def line(self, done: int) -> str:
        rate = done / max(time.monotonic() - self.start, 1e-6)
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and done < self.total:
            left = int((self.total - done) / rate)
            eta = f", ETA {left // 60}m{left % 60:02d}s"
        return f"{self.name}: {done / 1e6:.1f}{of} MB at {rate / 1e6:.1f} MB/s{eta}"


def check_integrity(name: str, meta: dict, size: int, sha256: str, sha1: str):
    if meta.get("size") is not None and size != meta["size"]:
        raise HubError(f"{name}: downloaded {size} bytes, the hub lists {meta['size']} (interrupted download?)")
    if meta.get("sha256") and sha256 != meta["sha256"]:
        raise HubError(f"{name}: SHA-256 {sha256} does not match the hub's {meta['sha256']} (corrupt download)")
    if meta.get("sha1") and sha1 != meta["sha1"]:
        raise HubError(f"{name}: git SHA-1 {sha1} does not match the hub's {meta['sha1']} (corrupt download)")
