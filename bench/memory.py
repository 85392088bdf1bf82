"""Per-rank training-state memory under ZeRO 0-3: measured vs theory, 2 ranks, MAE ViT-B.

    python -m bench.memory [--arch vit_base] [--processes 2]

For each of ds_configs/zero{0,1,2,3}.json, two real processes (torch.distributed.run, gloo, CPU) build
the MAE objective, run a training step on one image and the backward pass of a second one, and then
(before the second optimizer step, when gradients and optimizer state both exist) count the bytes of
every live tensor storage on rank 0, after gc: parameters, gradients, optimizer state and whatever
buffers DeepSpeed keeps. The backward pass has freed the activations by then. Theory, for Psi parameters
and N ranks: fp32 stage 0 is 16 Psi
(weights 4 + gradients 4 + Adam moments 8); bf16 keeps 2 + 2 bytes of 16-bit weights and gradients and
12 of fp32 master weights and moments, of which stage 1 partitions the 12, stage 2 also the gradients,
stage 3 everything: 4 Psi + 12 Psi/N, 2 Psi + 14 Psi/N, 16 Psi/N. Prints a table and a JSON line.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = {0: "fp32", 1: "bf16", 2: "bf16", 3: "bf16"}


def theory_bytes(stage, psi, ranks):
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / ranks, 2: 2 * psi + 14 * psi / ranks, 3: 16 * psi / ranks}[
        stage
    ]


def live_tensor_bytes():
    """Bytes of every distinct tensor storage alive in this process."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
    return sum(storages.values())


def worker(arch, stage):
    import deepspeed

    from pretrain.config import load_config
    from pretrain.graft.param_groups import objective_param_groups
    from pretrain.graft.start_weights import grafted_objective
    from pretrain.training.ds_config import deepspeed_config
    from pretrain.training.engine import match_batchnorm_statistics

    deepspeed.init_distributed()
    precision = STAGES[stage]
    config = load_config(
        None,
        [
            f"model.arch={arch}",
            f"deepspeed.precision={precision}",
            "deepspeed.micro_batch_size=1",
            f"deepspeed.config=ds_configs/zero{stage}.json",
        ],
    )
    baseline = live_tensor_bytes()
    torch.manual_seed(0)
    objective = grafted_objective(config)
    psi = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in objective_param_groups(objective, config)
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    world = torch.distributed.get_world_size()
    engine, *_ = deepspeed.initialize(
        model=objective, optimizer=optimizer, config=deepspeed_config(config, world)
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    match_batchnorm_statistics(objective, dtype)
    images = torch.randn(1, 3, 224, 224).to(dtype)
    engine.backward(engine(images)["loss"])
    engine.step()
    engine.backward(engine(images)["loss"])  # the peak: gradients are all there, the optimizer state too
    measured = live_tensor_bytes() - baseline - images.nbytes
    engine.step()
    if torch.distributed.get_rank() == 0:
        frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad)
        print(
            "RESULT "
            + json.dumps(
                {
                    "stage": stage,
                    "precision": precision,
                    "psi": psi,
                    "frozen_params": frozen,
                    "ranks": world,
                    "measured_bytes": measured,
                }
            ),
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_base")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="*", default=list(STAGES))
    parser.add_argument("--worker-stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_stage is not None:
        return worker(args.arch, args.worker_stage)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")
        ),
    }
    rows = []
    for stage in args.stages:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.processes),
                "-m",
                "bench.memory",
                "--arch",
                args.arch,
                "--worker-stage",
                str(stage),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        line = next((text for text in result.stdout.splitlines() if text.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"stage {stage} failed:\n{result.stderr[-3000:]}")
        row = json.loads(line[len("RESULT ") :])
        row["theory_bytes"] = theory_bytes(stage, row["psi"], row["ranks"])
        row["ratio"] = round(row["measured_bytes"] / row["theory_bytes"], 3)
        rows.append(row)
    print(f"{'ZeRO stage':<12}{'precision':>10}{'measured MB':>13}{'theory MB':>11}{'ratio':>7}")
    for row in rows:
        print(
            f"{row['stage']:<12}{row['precision']:>10}{row['measured_bytes'] / 1e6:>13.0f}"
            f"{row['theory_bytes'] / 1e6:>11.0f}{row['ratio']:>7.2f}"
        )
    print(
        f"Psi = {rows[0]['psi'] / 1e6:.1f} M trainable parameters, {args.processes} ranks, "
        "per-rank bytes of rank 0"
    )
    print(
        json.dumps(
            {
                "bench": "memory",
                "arch": args.arch,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                "rows": rows,
                "target_ratio": 1.1,
            }
        )
    )


if __name__ == "__main__":
    main()
