"""Does graft.rule=auto choose the split well? MIM->CL at every split against the automatic choice.

    python -m bench.graft_grid [--steps 150] [--seeds 0 1 2] [--splits 0 1 ... 12] [--probe-steps 20]
                               [--probe-every 2] [--workdir runs/reproduce]

For each seed, MoCo v3 (configs/graft_demo.yaml) starts from that seed's MAE run (bench/reproduce's,
trained here if missing) with rule `split` at every split k: the embeddings and blocks 0..k-1 at 0.1x
the learning rate, the rest at 1x (k = 0: only the embeddings are slowed; k = depth: every block). Then
with rule `auto`: a probe of `--probe-steps` hybrid steps from the same MAE weights measures the
per-block MIM-vs-CL gradient cosine and picks k (pretrain/graft/auto_split.py), and the grafted run trains
with it; its wall time includes the probe. Every run is scored on the val split like bench/reproduce
(kNN and 10-shot linear probe on the class token). Prints a table per split (mean +- std over seeds),
auto's choice and score, the grid's cost against auto's, and a JSON line; writes
WORKDIR/graft_grid.json (graft_grid_auto_pSTEPSeEVERY.json for another probe, whose run is named so).
"""

import argparse
import json
from pathlib import Path

from bench.reproduce import FEW, KNN, RUNS, evaluate, summary, train
from pretrain import demo
from pretrain.evaluation.features import encoder_from

DEPTH = 12


def auto_name(probe_steps, probe_every):
    """The auto run's name: `auto` for the default probe, else one that says which probe it had."""
    return "auto" if (probe_steps, probe_every) == (20, 2) else f"auto_p{probe_steps}e{probe_every}"


def grid_runs(splits, probe_steps, probe_every):
    runs = {"mae": RUNS["mae"]}
    for k in splits:
        runs[f"split{k:02d}"] = (
            "graft_demo.yaml",
            ["graft.rule=split", f"graft.split={k}", "graft.lower_scale=0.1", "graft.upper_scale=1.0"],
            "mae",
        )
    runs[auto_name(probe_steps, probe_every)] = (
        "graft_demo.yaml",
        [
            "graft.rule=auto",
            "graft.lower_scale=0.1",
            "graft.upper_scale=1.0",
            f"graft.probe_steps={probe_steps}",
            f"graft.probe_every={probe_every}",
        ],
        "mae",
    )
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", type=int, nargs="+", default=list(range(DEPTH + 1)))
    parser.add_argument("--probe-steps", type=int, default=20, help="hybrid steps of auto's probe")
    parser.add_argument("--probe-every", type=int, help="steps between its measurements (default: a tenth)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/reproduce"))
    args = parser.parse_args(argv)
    shards = demo.prepare_data(args.workdir / "data")
    args.probe_every = args.probe_every or max(1, args.probe_steps // 10)
    runs = grid_runs(args.splits, args.probe_steps, args.probe_every)
    auto = auto_name(args.probe_steps, args.probe_every)
    rows = {name: [] for name in runs if name != "mae"}
    for seed in args.seeds:
        train("mae", seed, args.steps, args.workdir, shards, runs)
        for name in rows:
            run_dir, seconds = train(
                name, seed, args.steps, args.workdir / "graft_grid", shards, runs, starts=args.workdir
            )
            row = {
                "seed": seed,
                "train_s": round(seconds, 1),
                **{
                    k: round(v, 3)
                    for k, v in evaluate(encoder_from(run_dir, "vit_tiny", 32, 8), shards).items()
                },
            }
            if name == auto:
                row["split"] = json.loads((run_dir / "graft_auto.json").read_text())["split"]
            rows[name].append(row)
            print(
                f"seed {seed} {name:8s} {KNN} {row[KNN]:5.1f}  {FEW} {row[FEW]:5.1f}  ({seconds:.0f} s)"
                + (f"  split {row['split']}" if name == auto else ""),
                flush=True,
            )

    table = {
        name: {m: summary([r[m] for r in rs]) for m in (KNN, FEW, "train_s")} for name, rs in rows.items()
    }
    print(f"\n{len(args.seeds)} seeds, {args.steps} steps per run, MIM->CL from the MAE run of each seed")
    print(f"{'run':10s}{KNN:>22s}{FEW:>26s}{'train s':>10s}")
    for name, t in table.items():
        print(
            f"{name:10s}{t[KNN][0]:15.2f} ± {t[KNN][1]:4.2f}{t[FEW][0]:19.2f} ± {t[FEW][1]:4.2f}"
            f"{t['train_s'][0]:10.0f}"
        )
    grid = [name for name in table if name.startswith("split")]
    verdicts = {}
    for metric in (KNN, FEW):
        best = max(grid, key=lambda name: table[name][metric][0])
        gap = table[best][metric][0] - table[auto][metric][0]
        verdicts[metric] = {
            "grid_best": best,
            "grid_best_mean": table[best][metric][0],
            "grid_best_std": table[best][metric][1],
            "auto_mean": table[auto][metric][0],
            "within_one_std": gap <= table[best][metric][1],
        }
        print(
            f"{metric}: grid best {best} {table[best][metric][0]:.2f} ± {table[best][metric][1]:.2f}, auto "
            f"{table[auto][metric][0]:.2f} "
            f"({'within' if gap <= table[best][metric][1] else 'NOT within'} one std)"
        )
    grid_cost = sum(table[name]["train_s"][0] for name in grid)
    print(
        f"auto chose splits {[r['split'] for r in rows[auto]]}; cost per seed: auto "
        f"{table[auto]['train_s'][0]:.0f} s "
        f"(probe included), grid {grid_cost:.0f} s ({grid_cost / table[auto]['train_s'][0]:.1f}x)"
    )
    record = {
        "bench": "graft_grid",
        "steps": args.steps,
        "seeds": args.seeds,
        "probe_steps": args.probe_steps,
        "probe_every": args.probe_every,
        "mean_std": {n: {m: [round(v, 3) for v in ms] for m, ms in t.items()} for n, t in table.items()},
        "verdicts": verdicts,
        "auto_splits": [r["split"] for r in rows[auto]],
        "grid_seconds_per_seed": round(grid_cost, 1),
        "runs": rows,
    }
    (args.workdir / ("graft_grid.json" if auto == "auto" else f"graft_grid_{auto}.json")).write_text(
        json.dumps(record, indent=1)
    )
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
