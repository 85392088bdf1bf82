"""Errors a user can fix, the exit codes of the commands, and an exit that cannot hang.

Exit codes: 0 done, 1 an unexpected error (traceback printed), 2 bad config or input (`UserError`, one
line), 3 the training diverged (`TrainingDiverged`), 130 interrupted, 128 + N stopped by signal N after
saving a checkpoint. lg-submit and users' scripts decide a requeue on them.
"""

import faulthandler
import functools
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from pathlib import Path

# After a command's main function has ended, the interpreter's own exit (joining DataLoader workers,
# closing process groups) gets this long; then the process exits anyway, with the code it was exiting with.
EXIT_GRACE_S = 20


class UserError(Exception):
    """Bad input the user can fix (a missing file, a wrong option): reported without a traceback."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite or exploded; the checkpoint from before stays
    `latest`."""

    exit_code = 3


def check_writable(path, what):
    """Raise UserError (naming `what`, e.g. "--out") unless a file can be written at `path`: checked by
    writing one beside it before any work is done, since permission bits say nothing to root. Creates the
    missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give the file to write")
    probe = path.with_name(f".{path.name}.{os.getpid()}.write-test")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{what} {path}: cannot write there ({error.strerror or error})") from None


def check_manifest(path, what, split):
    """The manifest file `path` given as `what` (e.g. "--val"): a folder lg-shard wrote stands for its
    SPLIT.json; anything else missing is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        if (path / f"{split}.json").is_file():
            return path / f"{split}.json"
        raise UserError(
            f"{what} {path} is a folder without {split}.json; give the manifest lg-shard wrote "
            f"(OUT/{split}.json)"
        )
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (a manifest lg-shard wrote: OUT/{split}.json)")
    return path


def exit_within(seconds, code):
    """Make sure this process exits, with `code`, at most `seconds` from now.

    A clean exit joins every child process, and one that does not stop hangs it for ever: a DataLoader
    worker ignores SIGTERM (pretrain.data.loader leaves stop signals to the trainer), so when it is stuck,
    or when
    its parent left it behind on an exception, multiprocessing's exit handler waits on it without end. On
    a cluster that holds the whole allocation until its time limit. The timer kills the children and
    ends the process; the workers also notice their parent's death within torch's 5-s watchdog interval.
    """

    def force_exit():
        time.sleep(seconds)
        print(f"exit held up for {seconds} s; what was running:", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        for child in multiprocessing.active_children():
            child.kill()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken stream must not keep the process alive
                pass
        os._exit(code)

    threading.Thread(target=force_exit, name="exit-deadline", daemon=True).start()


def exit_code_of(error):
    """The documented exit code of an exception (1 for one nobody anticipated)."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    return getattr(error, "exit_code", 1)


_active_commands = 0  # cli_entry wrappers running in this process (the demo calls other commands' mains)


def cli_entry(prog):
    """Decorate a `main(argv)`: a `UserError` becomes `prog: error: ...` and exit code 2, a diverged
    training `prog: stopped: ...` and 3, Ctrl-C 130, anything else its traceback and 1. After an error
    the process is gone at most EXIT_GRACE_S later (`exit_within`). A main called from another command's
    main returns or raises to its caller, which reports."""

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            global _active_commands
            if _active_commands:
                return main(argv)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            _active_commands += 1
            try:
                return main(argv)
            except BaseException as error:
                code = error.code if isinstance(error, SystemExit) else exit_code_of(error)
                if isinstance(error, UserError):
                    print(f"{prog}: error: {error}", file=sys.stderr)
                elif isinstance(error, TrainingDiverged):
                    print(f"{prog}: stopped: {error}", file=sys.stderr)
                elif isinstance(error, KeyboardInterrupt):
                    print(f"{prog}: interrupted", file=sys.stderr)
                elif not isinstance(error, SystemExit):
                    traceback.print_exc()
                    print(f"{prog}: failed: {type(error).__name__}: {error}", file=sys.stderr)
                # The frames of the traceback hold what the failed code had open (loaders, files); let go.
                traceback.clear_frames(error.__traceback__)
            finally:
                _active_commands -= 1
            if code:
                exit_within(EXIT_GRACE_S, code if isinstance(code, int) else 1)
            sys.exit(code)

        return wrapper

    return decorate
