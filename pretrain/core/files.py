"""Files written so that a reader never sees half of one, and their digests."""

import hashlib
import json
import os
import socket
from pathlib import Path

import torch


def sha256_of_file(path, chunk=1 << 22):
    """The SHA-256 (hex) of a file, read in 4-MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while data := file.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def temporary_path(path):
    """A temporary name beside `path`, of this host and process: two writers never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file, then rename it: a reader sees the old content or
    the new, never half a file."""
    temporary = temporary_path(path)
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomic(path, record):
    write_atomic(path, json.dumps(record, indent=1) + "\n")


def save_atomic(state, out):
    """torch.save `state` to `out` through a temporary file: a crash never leaves half a file there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(out)
    torch.save(state, temporary)
    os.replace(temporary, out)
