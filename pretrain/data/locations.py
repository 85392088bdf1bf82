"""Where shards live: local paths, or URLs opened by webdataset's own opener (webdataset.gopen).

* `http://`, `https://`: curl, as webdataset opens them;
* `pipe:COMMAND`: the command's stdout (e.g. `pipe:aws s3 cp s3://bucket/key -`);
* `gs://`: webdataset's gsutil handler; `s3://`: `aws s3 cp URL -`, registered here in webdataset's
  handler table (it has none for s3).

A shard read from a URL is a stream: it cannot be seeked or hashed before it is read, so the readers
skip members by reading them and hash it as it streams (`HashingReader`).
"""

import hashlib
import importlib
import shlex

# The module (webdataset's package exports a function of the same name in its place).
wds_gopen = importlib.import_module("webdataset.gopen")

READ_BUFFER = 1 << 16


def is_url(location):
    """True for a location webdataset opens (a scheme://, or pipe:), false for a local path."""
    location = str(location)
    return location.startswith("pipe:") or "://" in location


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    return wds_gopen.gopen_pipe(f"pipe:aws s3 cp {shlex.quote(url)} -", mode=mode, bufsize=bufsize)


wds_gopen.gopen_schemes.setdefault("s3", _gopen_s3)


def open_location(location):
    """A binary reader of a shard: the file, or the stream webdataset opens for a URL."""
    if is_url(location):
        return wds_gopen.gopen(str(location), "rb")
    return open(location, "rb", buffering=READ_BUFFER)


class HashingReader:
    """A reader that hashes (SHA-256) and counts what is read through it."""

    def __init__(self, stream):
        self.stream, self.sha256, self.bytes = stream, hashlib.sha256(), 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def seekable(self):
        return False

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def digest_of(location):
    """(SHA-256 hex digest, bytes) of a shard, read through once."""
    with open_location(location) as stream:
        reader = HashingReader(stream)
        while reader.read(1 << 20):
            pass
        return reader.sha256.hexdigest(), reader.bytes
