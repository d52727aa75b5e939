"""The hub download path, against a local HTTP server on 127.0.0.1 (never the real network).

The server lays out fixture files the way the hub does:
    /api/models/<repo>/tree/main   JSON listing (size, git SHA-1 or LFS SHA-256)
    /<repo>/resolve/main/<file>    the files
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from convert_sources import build_hf_model, load_cli, save_hf_folder
from npgpt.convert import HubError, convert, fetch_from_hub

REPO = "tiny-org/gpt2-tiny"


def hub_listing(folder: Path, corrupt: str | None = None) -> list[dict]:
    """The hub's tree listing for `folder`; model.safetensors is an LFS file. `corrupt`
    names a file whose listed hash is wrong."""
    entries = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        entry = {"type": "file", "path": path.name, "size": len(data)}
        if path.suffix == ".safetensors":
            entry["oid"] = "0" * 40  # the LFS pointer's git hash; unused
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        else:
            entry["oid"] = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        if path.name == corrupt:
            key = entry["lfs"] if "lfs" in entry else entry
            key["oid"] = "f" * len(key["oid"])
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_hf_folder(build_hf_model(seed=5), tmp_path_factory.mktemp("hub-source"))


def serve(root: Path):
    """A quiet threaded HTTP server for `root`; returns (server, base URL, request log)."""
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", log


@pytest.fixture
def hub(tmp_path, source):
    """Build the hub's layout for `source` and serve it; `hub(corrupt=name)` lists a wrong hash."""
    servers = []

    def start(corrupt=None):
        root = tmp_path / f"hub-root-{len(servers)}"
        files = root / REPO / "resolve" / "main"
        files.mkdir(parents=True)
        for path in source.iterdir():
            (files / path.name).write_bytes(path.read_bytes())
        listing = root / "api" / "models" / REPO / "tree" / "main"
        listing.parent.mkdir(parents=True)
        listing.write_text(json.dumps(hub_listing(source, corrupt)))
        server, url, log = serve(root)
        servers.append(server)
        return url, log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_then_cache_hit(tmp_path, hub, source, capsys):
    url, log = hub()
    cache = tmp_path / "cache"
    folder = fetch_from_hub(REPO, cache_dir=cache, endpoint=url)
    size = (source / "model.safetensors").stat().st_size
    assert f"model.safetensors: {size / 1e6:.1f}/{size / 1e6:.1f} MB at " in capsys.readouterr().err  # progress
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert not (folder / "generation_config.json").exists()  # only what conversion needs
    assert len(log) == 5  # the listing + 4 files
    assert fetch_from_hub(REPO, cache_dir=cache, endpoint=url) == folder
    assert len(log) == 5  # second call: served from the cache, no request at all
    (folder / "vocab.json").unlink()  # a damaged cache refetches just the missing file
    fetch_from_hub(REPO, cache_dir=cache, endpoint=url)
    assert log[5:] == [f"/{REPO}/resolve/main/vocab.json"]
    convert(folder, tmp_path / "out")


@pytest.mark.parametrize("corrupt, algorithm", [("model.safetensors", "SHA-256"), ("config.json", "SHA-1")])
def test_hash_mismatch_is_detected(tmp_path, hub, corrupt, algorithm):
    url, _ = hub(corrupt=corrupt)
    with pytest.raises(HubError, match=rf"{corrupt}: .*{algorithm}.*does not match"):
        fetch_from_hub(REPO, cache_dir=tmp_path / "cache", endpoint=url)
    folder = tmp_path / "cache" / REPO.replace("/", "--") / "main"
    assert not (folder / corrupt).exists() and not list(folder.glob("*.part"))


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: what being offline looks like."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_offline_fails_at_once_with_a_hint(tmp_path):
    start = time.monotonic()
    with pytest.raises(HubError, match=r"cannot reach.*pass their folder instead"):
        fetch_from_hub("gpt2", cache_dir=tmp_path, endpoint=closed_port_url())
    assert time.monotonic() - start < 5


def test_offline_env_and_unknown_repo(tmp_path, hub, monkeypatch):
    url, _ = hub()
    with pytest.raises(HubError, match="HTTP 404.*no such repository"):
        fetch_from_hub("nobody/nothing", cache_dir=tmp_path, endpoint=url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        fetch_from_hub(REPO, cache_dir=tmp_path, endpoint=url)


def test_cli_from_hub(tmp_path, hub, capsys):
    cli = load_cli()
    url, _ = hub()
    argv = ["--from-hub", REPO, "--hub-url", url, "--cache-dir", str(tmp_path / "cache"), "--out-root", str(tmp_path / "weights")]
    assert cli.main(argv) == 0
    assert (tmp_path / "weights" / "gpt2-tiny" / "model.safetensors").exists()
    assert cli.main(["--from-hub", REPO, "--hub-url", closed_port_url(), "--cache-dir", str(tmp_path / "empty")]) == 1
    assert "pass their folder instead" in capsys.readouterr().err
