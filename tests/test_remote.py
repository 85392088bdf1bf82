"""Shards at URLs, read through webdataset's opener, tested against a real HTTP server on 127.0.0.1
(Python's http.server in a subprocess): the same batches as from the files, bounded retries when the
server breaks off mid-shard, a clear error naming the URL when it never answers (or answers 404)."""

import logging
import socket
import subprocess
import sys
import time

import pytest
import torch

from pretrain.data.loader import DataUnavailable, make_loader
from pretrain.data.locations import HashingReader, open_location
from pretrain.data.manifest import Manifest
from pretrain.data.shard_tar import read_shard
from tests.conftest import run_cli

# A file server that breaks off the first BREAK_FIRST responses of each shard halfway (a connection
# lost mid-shard), or every one with BREAK_FIRST < 0, and serves the rest whole.
SERVER = r"""
import functools, http.server, os, sys
root, port, break_first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
served = {}

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        count = served[path] = served.get(path, 0) + 1
        if not os.path.isfile(path) or not (break_first < 0 or count <= break_first):
            return super().do_GET()
        data = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.connection.shutdown(2)
        self.close_connection = True

http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler,
directory=root)).serve_forever()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, break_first=0):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(port), str(break_first)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail("the test HTTP server did not start")


@pytest.fixture
def served(demo_shards):
    process, base = start_server(demo_shards)
    yield base
    process.kill()
    process.wait()


def url_manifest(demo_shards, base, out, split="train", rename=None):
    """A copy of a split's manifest whose shards are named by their URLs under `base`."""
    manifest = Manifest.load(demo_shards / f"{split}.json")
    for shard in manifest.shards:
        shard.name = f"{base}/{(rename or {}).get(shard.name, shard.name)}"
    manifest.save(out)
    return out


def batches(manifest, count, **options):
    loader = make_loader(
        manifest, 16, view="mae", img_size=32, mode="resampled", num_workers=0, seed=3, **options
    )
    stream = loader.epoch(0)
    return [next(stream) for _ in range(count)], loader


def test_shards_from_urls_give_the_batches_of_the_files(demo_shards, served, tmp_path):
    remote = url_manifest(demo_shards, served, tmp_path / "train.json")
    assert Manifest.load(remote).urls[0].startswith("http://127.0.0.1:")
    local, _ = batches(demo_shards / "train.json", 6)
    streamed, loader = batches(remote, 6)
    for a, b in zip(local, streamed):
        assert (
            a["keys"] == b["keys"]
            and torch.equal(a["images"], b["images"])
            and torch.equal(a["labels"], b["labels"])
        )
    assert loader.lost_samples == loader.skipped_shards == 0
    epoch = make_loader(
        remote, 32, view="eval", img_size=32, mode="epoch", num_workers=2, rank=0, world_size=1
    )
    # Every image once.
    assert sum(len(b["labels"]) for b in epoch.epoch(0)) == Manifest.load(remote).num_samples


def test_a_streamed_shard_hashes_to_the_files_digest(demo_shards, served):
    """read_shard reads a stream past the end-of-archive marker to its end: the digest is the file's."""
    for shard in Manifest.load(demo_shards / "train.json").shards[:3]:
        reader = HashingReader(open_location(f"{served}/{shard.name}"))
        assert sum(1 for _ in read_shard(shard.name, stream=reader)) == shard.num_samples
        assert (reader.sha256.hexdigest(), reader.bytes) == (shard.sha256, shard.bytes)


def test_a_shard_that_breaks_off_is_retried_and_read_exactly_once(demo_shards, tmp_path, caplog):
    process, base = start_server(demo_shards, break_first=1)  # each shard's first response breaks off
    try:
        remote = url_manifest(demo_shards, base, tmp_path / "train.json")
        local, _ = batches(demo_shards / "train.json", 4)
        with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
            streamed, loader = batches(remote, 4, url_backoff=0.05)
    finally:
        process.kill()
    for a, b in zip(local, streamed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    assert loader.lost_samples == 0
    retries = [r.getMessage() for r in caplog.records if "opening it again" in r.getMessage()]
    assert retries and all("broke off after" in m and "(retry 1 of 3)" in m for m in retries)


@pytest.mark.parametrize("case", ["always_breaks", "not_found", "no_server"])
def test_an_unreadable_url_stops_with_an_error_naming_it_after_bounded_retries(demo_shards, tmp_path, case):
    process, base = start_server(demo_shards, break_first=-1) if case == "always_breaks" else (None, None)
    if case == "no_server":
        base = f"http://127.0.0.1:{free_port()}"
    if case == "not_found":
        process, base = start_server(demo_shards)
    rename = (
        {shard.name: "missing.tar" for shard in Manifest.load(demo_shards / "train.json").shards}
        if case == "not_found"
        else None
    )
    remote = url_manifest(demo_shards, base, tmp_path / "train.json", rename=rename)
    started = time.monotonic()
    try:
        with pytest.raises(
            DataUnavailable,
            match=r"shard http://127\.0\.0\.1:\d+/\S+ could not be read after 2 "
            r"retries",
        ) as error:
            batches(remote, 2, url_retries=2, url_backoff=0.05)
    finally:
        if process is not None:
            process.kill()
    assert time.monotonic() - started < 60  # bounded, not curl's 30 retries or a hang
    if case == "not_found":
        assert "missing.tar" in str(error.value)


def test_lg_verify_reads_shards_from_urls(demo_shards, served, tmp_path):
    url_manifest(demo_shards, served, tmp_path / "train.json")
    result = run_cli("data_prep.verify", tmp_path, "--split", "train")
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
