"""lg-submit: run lg-pretrain as a multi-node Slurm job through submitit, requeued on preemption.

    lg-submit --config configs/mae_vit_l.yaml [key=value ...] --nodes 8 --gpus-per-node 8
              [--partition P] [--account A] [--qos Q] [--time MIN] [--constraint C] [--mem 400G]
              [--cpus-per-task 10] [--job-dir DIR] [--signal-delay 120] [--max-requeues 20]
              [--dry-run] [--local]

One Slurm task per GPU (on CPU nodes, --tasks-per-node processes); each task takes its rank, local rank,
world size and the master address from submitit's job environment and runs `pretrain.train.run`, the
code path of lg-pretrain itself. The job directory (default: the run directory) holds submitit's files
under `submitit/`; the run directory is the config's `run.dir`. Submitting the same run again resumes it.

Requeue: Slurm sends USR2 `--signal-delay` seconds before the time limit (and submitit's preemption
signals); every rank finishes its step, the run saves a checkpoint, and rank 0 has submitit requeue the
job, which resumes from that checkpoint. A job that fails with an error is not requeued; preemptions
requeue it at most --max-requeues times.

Sweeps: an override whose value is a list where the key holds one value (`hybrid.weight=[0.25,0.5]`)
submits a job array, one run directory per value (RUN_DIR/hybrid.weight=0.25, ...).
"""

import argparse
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from pretrain.config import Config, load_config
from pretrain.core.errors import EXIT_GRACE_S, UserError, cli_entry, exit_code_of, exit_within


class Trainer:
    """The submitted callable: one per run, pickled by submitit, called in every task.
    A submitit `Checkpointable` (duck-typed: submitit only looks for `checkpoint`)."""

    def __init__(self, config_path, overrides, max_requeues):
        self.config_path, self.overrides, self.max_requeues = config_path, list(overrides), max_requeues

    def __call__(self):
        import submitit

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from pretrain.train import run

        try:
            code = run(load_config(self.config_path, self.overrides))
        except BaseException as error:
            # submitit records the error and exits; that exit must not hang on the loader's workers.
            exit_within(EXIT_GRACE_S, exit_code_of(error))
            raise
        if code == 128 + signal.SIGUSR2:
            # The run saved a checkpoint; submitit's own handler (put back by the engine) asks for the
            # requeue on rank 0 (it calls `checkpoint` below) and exits.
            handler = signal.getsignal(signal.SIGUSR2)
            if callable(handler):
                handler(signal.SIGUSR2, None)
        if code:
            exit_within(EXIT_GRACE_S, code)
            raise SystemExit(code)  # no result file: Slurm requeues or ends the job; a divergence is final
        return code

    def checkpoint(self, *args, **kwargs):
        """What submitit requeues: the same call (the run resumes from its latest checkpoint), or None
        (no requeue) once the job has been requeued max_requeues times."""
        import submitit

        if int(os.environ.get("SLURM_RESTART_COUNT", 0)) >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(
            Trainer(self.config_path, self.overrides, self.max_requeues)
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides; a list value sweeps"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU (0: CPU nodes)")
    parser.add_argument("--tasks-per-node", type=int, help="tasks per node on CPU nodes (default 1)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--time", type=int, default=60 * 24, help="time limit in minutes (default 1440)")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", help="memory per node, Slurm syntax (e.g. 400G; 0 = all)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--job-dir", type=Path, help="submitit's files (default: RUN_DIR/submitit)")
    parser.add_argument("--job-name", default="layergraft")
    parser.add_argument(
        "--signal-delay", type=int, default=120, help="seconds between USR2 and the time limit"
    )
    parser.add_argument("--max-requeues", type=int, default=20, help="preemption requeues allowed per job")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and the task command")
    parser.add_argument("--local", action="store_true", help="submitit's local executor (no Slurm)")
    return parser.parse_intermixed_args(argv)


def field_type(key):
    """The dataclass field type of a dotted config key (None if there is no such key)."""
    kind = Config
    for part in key.split("."):
        hints = typing.get_type_hints(kind) if hasattr(kind, "__dataclass_fields__") else {}
        if part not in hints:
            return None
        kind = hints[part]
    return kind


def expand_sweep(overrides):
    """[(name, overrides)]: the one run, or one per combination of the list values given to keys that hold
    a single value (optim.betas=[0.9,0.95] is one value, hybrid.weight=[0.25,0.5] two runs)."""
    fixed, swept = [], []
    for text in overrides:
        key, _, raw = text.partition("=")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, list) and typing.get_origin(field_type(key)) is not list:
            swept.append([f"{key}={item}" for item in value])
        else:
            fixed.append(text)
    return [(",".join(combo), fixed + list(combo)) for combo in itertools.product(*swept)]


def executor_for(args, job_dir):
    import submitit

    if args.local:
        # The local executor does not expand %j in its folder (it would leave a folder named "%j"); its
        # files carry the job id in their names anyway.
        executor = submitit.LocalExecutor(folder=job_dir)
        executor.update_parameters(timeout_min=args.time, tasks_per_node=args.tasks_per_node or 1, nodes=1)
        return executor
    if not shutil.which("sbatch"):
        raise UserError(
            "no Slurm here (sbatch is not on PATH); use --local to run with submitit's local executor"
        )
    check_partition(args.partition)
    executor = submitit.SlurmExecutor(folder=job_dir / "%j", max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def slurm_parameters(args):
    gpus = args.gpus_per_node
    parameters = dict(
        job_name=args.job_name,
        nodes=args.nodes,
        ntasks_per_node=gpus or args.tasks_per_node or 1,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal_delay_s=args.signal_delay,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        mem=args.mem,
        gpus_per_node=gpus or None,
    )
    return {key: value for key, value in parameters.items() if value is not None}


def check_partition(partition):
    if partition is None:
        return
    result = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise UserError(f"Slurm is not reachable: sinfo says {result.stderr.strip() or result.returncode}")
    known = sorted(set(result.stdout.split()))
    if partition not in known:
        raise UserError(
            f"--partition {partition}: not a partition of this cluster (sinfo lists: {', '.join(known)})"
        )


def dry_run(args, job_dir, runs):
    """The sbatch script submitit would write, and what each task runs."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {job_dir}/%j"
    print(_make_sbatch_string(command=command, folder=job_dir / "%j", **slurm_parameters(args)))
    for overrides in runs:
        print(
            f"# each task: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from submitit's job "
            f"environment, "
            f"then pretrain.train.run(load_config({args.config!r}, {overrides!r}))"
        )


@cli_entry("lg-submit")
def main(argv=None):
    args = parse_args(argv)
    runs = expand_sweep(args.overrides)
    base_dir = Path(load_config(args.config, [o for o in args.overrides if o in runs[0][1]]).run.dir)
    for index, (name, overrides) in enumerate(runs):  # every config is checked before anything is submitted
        if name:
            overrides = overrides + [f"run.dir={base_dir / name}"]
        runs[index] = (load_config(args.config, overrides), overrides)
    job_dir = (args.job_dir or base_dir / "submitit").resolve()
    if args.dry_run:
        dry_run(args, job_dir, [overrides for _, overrides in runs])
        return 0
    executor = executor_for(args, job_dir)
    trainers = [
        Trainer(str(Path(args.config).resolve()), overrides, args.max_requeues) for _, overrides in runs
    ]
    with executor.batch() if len(trainers) > 1 else contextlib.nullcontext():
        jobs = [executor.submit(trainer) for trainer in trainers]
    for job, (config, _) in zip(jobs, runs):
        print(f"submitted job {job.job_id}: run dir {config.run.dir}, log {job.paths.stdout}")
    print(f"TensorBoard: tensorboard --logdir {base_dir}")
    if args.local:  # the local executor's tasks are this machine's processes: wait for them
        for job in jobs:
            codes = job.results()
            print(f"job {job.job_id} finished: exit codes {codes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
