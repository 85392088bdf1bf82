"""One run per run directory: rank 0 holds an exclusive lock on RUN_DIR/lock for the whole run.

Two runs in one directory would overwrite each other's checkpoints (and both write `latest`). The lock is
a `flock` on the file, so the kernel releases it however the owner ends (an exception, SIGKILL, a node
lost and its job requeued elsewhere: on network file systems that support flock). The file keeps the
owner's host and pid, for the message the second run prints; it is left in place, which is harmless.
"""

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from pretrain.core.distributed import rank, rank0_value
from pretrain.core.errors import UserError

log = logging.getLogger(__name__)
LOCK = "lock"


class RunLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.fd = None

    def acquire(self):
        """Take the lock or raise UserError naming its owner. A file system without flock gets a warning."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"run.dir {self.path.parent}: cannot write there ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another run ({owner}); wait for it to end, or "
                "give this one another run.dir"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning(
                "%s: the file system does not support flock (%s); two runs in this directory would not "
                "be stopped",
                self.path,
                error,
            )
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"host {socket.gethostname()} pid {os.getpid()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def lock_run_dir(run_dir):
    """Rank 0 locks RUN_DIR; when it cannot, every rank raises its UserError (a collective)."""
    lock, problem = RunLock(run_dir), None
    if rank() == 0:
        try:
            lock.acquire()
        except UserError as error:
            problem = str(error)
    problem = rank0_value(problem)
    if problem:
        raise UserError(problem)
    return lock
