"""Errors a user can fix, and the wrapper that turns them into one line and exit code 2."""
import functools
import logging
import sys


class UserError(Exception):
    """Bad input the user can fix (a missing file, a wrong option): reported without a traceback."""


def cli_entry(prog):
    """Decorate a `main(argv)`: a `UserError` becomes `prog: error: ...` and exit code 2, Ctrl-C exit code 130."""

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            try:
                return main(argv)
            except UserError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)

        return wrapper

    return decorate
