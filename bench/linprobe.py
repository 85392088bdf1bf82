"""The papers' linear probes beside the fast one, on the demo's encoders: top-1 and wall time.

    python -m bench.linprobe [--demo runs/demo] [--workdir runs/bench_linprobe] [--tune]

For each encoder the demo wrote (`make demo`: MAE, MoCo v3, MIM->CL, plus a random ViT-Tiny/8 of the
same shape), three protocols on the embedded digits:
* cached: `lg-eval linear` (full-batch AdamW on cached, un-augmented class-token features, 300 epochs);
* mae: `lg-eval linear --protocol mae` (configs/linprobe_mae_demo.yaml: BatchNorm + linear head, LARS,
  crops, 10 epochs on 2 processes, val every 2 epochs);
* mocov3: `lg-eval linear --protocol mocov3` (configs/linprobe_mocov3_demo.yaml: linear head, SGD).
`--tune` instead chooses the demo configs' base lr for the two trained protocols without reading val:
each candidate is trained on the first shards of the train split and scored on its last 3 (bench.tune's
cut), on the MAE and MoCo v3 encoders. Prints a table and a JSON line, writes WORKDIR/results.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.tune import split_train
from pretrain.models import create_encoder

REPO = Path(__file__).resolve().parents[1]
ENCODERS = {"random init": None, "MAE": "mae", "MoCo v3": "mocov3", "MIM->CL": "graft"}
PROTOCOLS = ("cached", "mae", "mocov3")
CANDIDATE_LRS = {"mae": [3.0, 30.0, 300.0, 3000.0], "mocov3": [0.003, 0.03, 0.3, 3.0, 30.0]}
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def random_encoder(path):
    """A random ViT-Tiny/8 at 32 px in lg-export's layout (the 'random init' row)."""
    torch.manual_seed(0)
    torch.save(create_encoder("vit_tiny", 32, 8).state_dict(), path)
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "timm": {
                    "model_name": "vit_tiny_patch16_224",
                    "num_classes": 0,
                    "img_size": 32,
                    "patch_size": 8,
                }
            }
        )
    )
    return path


def probe(protocol, encoder, train, val, out_dir, *overrides):
    """Run one protocol; (result dict, wall seconds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "result.json"
    if out.is_file():  # a rerun reuses what the first one measured
        return json.loads(out.read_text()), json.loads((out_dir / "seconds.json").read_text())
    command = [
        sys.executable,
        "-m",
        "pretrain.eval",
        "linear",
        str(encoder),
        "--train",
        str(train),
        "--val",
        str(val),
        "--out",
        str(out),
    ]
    if protocol != "cached":
        command[1:2] = ["-m", "pretrain.launch", "--standalone", "--nproc_per_node", "2", "-m"]
        command += [
            "--protocol",
            protocol,
            "--config",
            str(REPO / "configs" / f"linprobe_{protocol}_demo.yaml"),
            f"run.dir={out_dir / 'run'}",
            *overrides,
        ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode == 3:  # stopped by the divergence guard: a candidate lr too high, recorded as such
        out.write_text(json.dumps({"top1": None, "diverged": result.stderr.split("stopped: ")[-1][:200]}))
    elif result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    (out_dir / "seconds.json").write_text(json.dumps(seconds))
    return json.loads(out.read_text()), seconds


def tune(demo, workdir):
    manifests = split_train(demo / "shards")
    rows = {}
    for protocol, lrs in CANDIDATE_LRS.items():
        for lr in lrs:
            scores = []
            for name in ("MAE", "MoCo v3"):
                encoder = demo / ENCODERS[name] / "encoder.pth"
                result, _ = probe(
                    protocol,
                    encoder,
                    manifests["tune_train"],
                    manifests["tune_val"],
                    workdir / "tune" / f"{protocol}_lr{lr:g}_{ENCODERS[name]}",
                    f"optim.base_lr={lr}",
                )
                scores.append(result["top1"])
            mean = None if None in scores else round(sum(scores) / 2, 2)
            rows[f"{protocol} base_lr {lr:g}"] = {"MAE": scores[0], "MoCo v3": scores[1], "mean": mean}
    print(f"\n{'candidate':<24}{'MAE':>9}{'MoCo v3':>9}{'mean':>9}   (top-1 % on the held-out train shards)")
    for name, row in rows.items():
        print(
            f"{name:<24}"
            + "".join(
                f"{row[k]:>9.2f}" if row[k] is not None else f"{'diverged':>9}"
                for k in ("MAE", "MoCo v3", "mean")
            )
        )
    return rows


def compare(demo, workdir):
    table = {}
    train, val = demo / "shards" / "train.json", demo / "shards" / "val.json"
    for name, run in ENCODERS.items():
        encoder = demo / run / "encoder.pth" if run else random_encoder(workdir / "random_encoder.pth")
        table[name] = {}
        for protocol in PROTOCOLS:
            result, seconds = probe(protocol, encoder, train, val, workdir / (run or "random") / protocol)
            table[name][protocol] = {
                "top1": result["top1"],
                "best": (result.get("best") or {}).get("top1"),
                "seconds": round(seconds, 1),
            }
    print(f"\n{'encoder':<14}" + "".join(f"{p + ' top-1':>14}{'(best)':>8}{'s':>6}" for p in PROTOCOLS))
    for name, row in table.items():
        cells = []
        for protocol in PROTOCOLS:
            r = row[protocol]
            best = f"{r['best']:.2f}" if r["best"] is not None else "-"
            cells.append(f"{r['top1']:>14.2f}{best:>8}{r['seconds']:>6.0f}")
        print(f"{name:<14}" + "".join(cells))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="the demo's workdir")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_linprobe")
    parser.add_argument(
        "--tune", action="store_true", help="choose the demo configs' lr on held-out train shards"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = (
        {"tune": tune(args.demo, args.workdir)}
        if args.tune
        else {"compare": compare(args.demo, args.workdir)}
    )
    (args.workdir / ("tune.json" if args.tune else "results.json")).write_text(
        json.dumps(results, indent=1) + "\n"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
