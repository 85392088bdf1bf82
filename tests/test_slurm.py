"""lg-submit on a real Slurm (slurm/local_cluster.py: 2 fake nodes on this host), DeepSpeed on CPU.

Every wait has a deadline: a job that dies or hangs fails its test (and is cancelled), never hangs it.
"""

import os
import shutil
import subprocess
import time

import pytest
import torch

from pretrain.core.checkpoint import latest_tag, run_state, tag_of
from pretrain.core.weights import consolidated_state_dict
from slurm.submit import expand_sweep
from tests.conftest import REPO, TRAIN_ENV, run_cli, scalar_values

STEPS = 24
JOB = [
    "--nodes",
    "2",
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "1",
    "--cpus-per-task",
    "1",
    "--time",
    "30",
    "model.patch_size=4",
    "deepspeed.micro_batch_size=32",
    "data.num_workers=1",
    "run.log_every=1",
    "run.image_every=0",
    "run.save_every=1000",
    f"run.max_steps={STEPS}",
    "optim.epochs=2",
    "deepspeed.config=ds_configs/zero2.json",
    "deepspeed.precision=fp32",
]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm: the machine's own, or the local 2-node one started (and stopped) here."""
    if shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "CI=true needs the slurm tests: run them as root (they install and start a local Slurm)"
            )
        pytest.skip(
            "no Slurm here: run the tests as root (they start a local one) or start one with "
            "`sudo python -m slurm.local_cluster start`"
        )
    result = subprocess.run(
        ["python3", "-m", "slurm.local_cluster", "start"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield
    subprocess.run(
        ["python3", "-m", "slurm.local_cluster", "stop"], cwd=REPO, capture_output=True, timeout=300
    )


def submit(run_dir, manifest, *extra):
    result = run_cli(
        "slurm.submit",
        "--config",
        REPO / "configs" / "demo.yaml",
        *JOB,
        f"run.dir={run_dir}",
        f"data.train={manifest}",
        *extra,
        env={**os.environ, **TRAIN_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("submitted job ")[1].split(":")[0]


def wait_for(condition, deadline_s, job_id, what):
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True)
            pytest.fail(f"job {job_id}: {what} not reached in {deadline_s} s")
        time.sleep(1)


def job_finished(job_id):
    queue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return queue.returncode != 0 or not queue.stdout.strip()


def rank0_log(run_dir, job_id):
    """Task 0's stdout and stderr (appended to across requeues)."""
    paths = [run_dir / "submitit" / job_id / f"{job_id}_0_log.{kind}" for kind in ("out", "err")]
    return "".join(path.read_text(errors="replace") for path in paths if path.exists())


@pytest.fixture(scope="module")
def manifest(demo_shards):
    return demo_shards / "train.json"


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm_plain")
    job_id = submit(run_dir, manifest)
    wait_for(lambda: job_finished(job_id), 600, job_id, "the end")
    return run_dir, job_id


@pytest.mark.slurm
def test_two_node_job_trains_with_both_ranks(uninterrupted):
    run_dir, job_id = uninterrupted
    assert latest_tag(run_dir / "ckpt") == tag_of(STEPS), rank0_log(run_dir, job_id)[-3000:]
    assert run_state(run_dir / "ckpt")["world_size"] == 2  # both tasks joined one process group
    optimizer_shards = sorted(p.name for p in (run_dir / "ckpt" / tag_of(STEPS)).glob("*optim_states.pt"))
    assert len(optimizer_shards) == 2, optimizer_shards  # ZeRO-2 partitioned the optimizer over the two ranks
    assert len(scalar_values(run_dir, "loss")) == STEPS
    for task in (0, 1):  # one task per fake node
        assert f"node={task}(2)" in (run_dir / "submitit" / job_id / f"{job_id}_{task}_log.out").read_text()


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_ends_as_the_uninterrupted_one(uninterrupted, manifest, tmp_path):
    import submitit

    run_dir = tmp_path / "preempted"
    job_id = submit(run_dir, manifest)
    wait_for(lambda: "step 6/" in rank0_log(run_dir, job_id), 300, job_id, "step 6")
    submitit.SlurmJob(run_dir / "submitit" / "%j", job_id)._interrupt()  # SIGTERM + USR2, as a preemption
    wait_for(
        lambda: job_finished(job_id) and latest_tag(run_dir / "ckpt") == tag_of(STEPS),
        600,
        job_id,
        "the requeued job's end",
    )
    log = rank0_log(run_dir, job_id)
    assert "saved checkpoint" in log and "resumed" in log and "Requeued job" in log, log[-3000:]
    stopped_at = int(log.split("stopped at step ")[1].split(" ")[0])
    assert 6 <= stopped_at < STEPS
    expected = consolidated_state_dict(uninterrupted[0] / "ckpt", tag_of(STEPS))
    actual = consolidated_state_dict(run_dir / "ckpt", tag_of(STEPS))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.slurm
def test_a_linear_probe_runs_on_two_nodes_and_reports_its_frozen_encoder_unchanged(
    slurm_cluster, demo_shards, tmp_path
):
    """The papers' protocols run on Slurm through lg-submit like pretraining: MAE's linear probe (LARS,
    ZeRO stage 0) on 2 nodes, measured at the end by both ranks."""
    import json

    from tests.test_eval import exported_encoder

    encoder = exported_encoder(tmp_path / "encoder.pth")
    run_dir = tmp_path / "probe"
    result = run_cli(
        "slurm.submit",
        "--config",
        REPO / "configs" / "linprobe_mae_demo.yaml",
        *JOB[:8],
        f"run.dir={run_dir}",
        f"data.train={demo_shards / 'train.json'}",
        "model.patch_size=8",
        f"finetune.val={demo_shards / 'val.json'}",
        f"graft.init={encoder}",
        "run.max_steps=4",
        "deepspeed.micro_batch_size=16",
        "data.num_workers=1",
        env={**os.environ, **TRAIN_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.split("submitted job ")[1].split(":")[0]
    wait_for(lambda: job_finished(job_id), 600, job_id, "the end")
    assert (run_dir / "eval_linprobe.json").is_file(), rank0_log(run_dir, job_id)[-3000:]
    reported = json.loads((run_dir / "eval_linprobe.json").read_text())
    assert (
        reported["protocol"],
        reported["steps"],
        reported["val_samples"],
        reported["frozen_unchanged"],
    ) == ("mae", 4, 359, True)
    assert run_state(run_dir / "ckpt")["world_size"] == 2


@pytest.mark.slurm
def test_unknown_partition_names_the_known_ones(slurm_cluster, manifest, tmp_path):
    result = run_cli(
        "slurm.submit",
        "--config",
        REPO / "configs" / "demo.yaml",
        *JOB,
        "--partition",
        "gpu-nope",
        f"run.dir={tmp_path}",
        f"data.train={manifest}",
    )
    assert result.returncode == 2 and "--partition gpu-nope" in result.stderr and "debug" in result.stderr


def test_dry_run_for_8_nodes_of_8_gpus():
    result = run_cli(
        "slurm.submit",
        "--config",
        REPO / "configs" / "mae_vit_l.yaml",
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--signal-delay",
        "180",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --partition=gpu",
        "srun ",
    ):
        assert line in result.stdout, line
    assert "pretrain.train.run(load_config(" in result.stdout


@pytest.mark.slow
def test_config_errors_and_missing_slurm_stop_before_submitting(tmp_path):
    bad = run_cli("slurm.submit", "--config", REPO / "configs" / "demo.yaml", "optim.base_lr=-1", "--dry-run")
    assert bad.returncode == 2 and "optim.base_lr" in bad.stderr
    no_slurm = run_cli(
        "slurm.submit",
        "--config",
        REPO / "configs" / "demo.yaml",
        f"run.dir={tmp_path}",
        env={**os.environ, "PATH": os.path.dirname(shutil.which("python3"))},
    )
    assert no_slurm.returncode == 2 and "no Slurm here" in no_slurm.stderr and "--local" in no_slurm.stderr


def test_a_list_value_sweeps_unless_the_key_holds_a_list():
    runs = expand_sweep(
        ["hybrid.weight=[0.25,0.5]", "optim.betas=[0.9,0.95]", "model.arch=[vit_tiny,vit_small]"]
    )
    assert [name for name, _ in runs] == [
        "hybrid.weight=0.25,model.arch=vit_tiny",
        "hybrid.weight=0.25,model.arch=vit_small",
        "hybrid.weight=0.5,model.arch=vit_tiny",
        "hybrid.weight=0.5,model.arch=vit_small",
    ]
    assert all("optim.betas=[0.9,0.95]" in overrides for _, overrides in runs)
    assert expand_sweep(["optim.base_lr=1e-3"]) == [("", ["optim.base_lr=1e-3"])]


@pytest.mark.dist
def test_local_executor_runs_the_same_job_without_slurm(manifest, tmp_path):
    result = run_cli(
        "slurm.submit",
        "--local",
        "--config",
        REPO / "configs" / "demo.yaml",
        "--tasks-per-node",
        "2",
        f"run.dir={tmp_path}",
        f"data.train={manifest}",
        "model.patch_size=8",
        "deepspeed.micro_batch_size=16",
        "run.max_steps=2",
        env=TRAIN_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished: exit codes [0, 0]" in result.stdout
    assert run_state(tmp_path / "ckpt")["world_size"] == 2 and latest_tag(tmp_path / "ckpt") == tag_of(2)
    assert not any("%j" in p.name for p in tmp_path.rglob("*")), "no folder named after an unexpanded %j"


def test_requeues_are_bounded(monkeypatch):
    import submitit

    from slurm.submit import Trainer

    trainer = Trainer("configs/demo.yaml", ["run.max_steps=2"], max_requeues=3)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    again = trainer.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function.overrides == [
        "run.max_steps=2"
    ]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert trainer.checkpoint() is None  # submitit then ends the job instead of requeuing it
