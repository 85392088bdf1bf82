"""lg-torchrun: torchrun that exits with the training's own exit code.

    lg-torchrun [torchrun options] -m pretrain.train --config configs/mae_vit_l.yaml [key=value ...]

torchrun exits 1 whenever a worker fails, so the codes lg-pretrain documents (2 bad config or input,
3 diverged, 128 + N stopped by signal N after a checkpoint; pretrain.core.errors) would be lost to the
scripts that decide a requeue on them. This runs torchrun's own launcher (torch.distributed.run, with
all its options) and exits with the code of the worker that failed for a reason of its own.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def root_cause_exit_code(failures):
    """The exit code that says why the workers failed, from torchrun's {rank: ProcessFailure}.

    A worker that exits by itself counts before one the agent killed (negative exit code: -signal).
    Among those, a specific code (2, 3, 128 + N) comes before 1: when one rank fails, its peers see
    their collectives broken and fail with 1 too, in the same second (the failures' timestamps are
    whole seconds). Ties go to the earliest, then to the lowest rank.
    """
    failures = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    exited = [f.exitcode for _, f in failures if f.exitcode > 0]
    specific = [code for code in exited if code != 1]
    if specific or exited:
        return (specific or exited)[0]
    return 128 - failures[0][1].exitcode  # killed by signal N: the shell's 128 + N


def main(argv=None):
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        print(error.format_msg(), file=sys.stderr)
        return root_cause_exit_code(error.failures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
