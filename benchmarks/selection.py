"""Label-free selection benchmark: how good is the trial the tune job would pick, against the best by labels?

    python benchmarks/selection.py --config configs/demo.yaml --space "{k: [6, 8, 10, 12, 14, 16]}" --seeds 0 1

Trains every combination of --space (the syntax of `tune.space`) for each seed, in this process, and scores each
run with the tune job's label-free scores (clustering.metrics.label_free) and with ACC. For each seed it shows
the run each score picks and its ACC against the best ACC among the runs (DESIGN target: within 0.02, and k = 10
found among 6..16 on MNIST). Prints a table and writes JSON. Not part of the test suite.

--predictions keeps every run's clusters (.npz); --rescore scores such a file again with the current label-free
scores, without training, to compare a new score on the same runs.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import yaml
from common import load_arrays, print_table, write_json
from scipy.stats import spearmanr

from clustering import engine, metrics
from clustering.config import PipelineConfig, grid_values, load_config, trial_config
from clustering.methods import predict_all

PICKS = ("modularity", "silhouette", "evenness")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="sklearn:digits", help="image folder, MNIST IDX folder, .npz or sklearn:digits")
    p.add_argument("--config", default=None, help="YAML with a train: section (configs/*.yaml)")
    p.add_argument("--set", nargs="*", default=[], help="overrides, e.g. train.joint_epochs=20")
    p.add_argument("--space", required=True, help='train values to try, e.g. "{k: [8, 10, 12]}"')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--limit", type=int, default=None, help="first N images only (quick checks)")
    p.add_argument("--sample", type=int, default=10_000, help="images the label-free scores are measured on")
    p.add_argument("--out", default="results/selection.json")
    p.add_argument("--predictions", default=None, help="also write every run's clusters here (.npz), to study scores")
    p.add_argument("--rescore", nargs="*", default=[], help="--predictions files: score their runs again instead of "
                                                             "training (same --data, --limit and --space)")
    args = p.parse_args()

    base = load_config(PipelineConfig, args.config, args.set).train
    space = yaml.safe_load(args.space)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = load_arrays(args.data, args.limit)
    print(f"{args.data}: {images.shape} on {device}", flush=True)

    def scored(run: dict, pred: np.ndarray, k: int) -> dict:
        found = {**metrics.label_free(images, pred, k, args.sample), "acc": metrics.cluster_acc(labels, pred)}
        out = {**run, **{key: round(v, 4) for key, v in found.items()}}
        print("  " + " ".join(f"{key} {v}" for key, v in out.items()), flush=True)
        return out

    runs, preds = [], []
    for path in args.rescore:
        saved = np.load(path)
        for run, pred in zip(json.loads(str(saved["runs"])), saved["clusters"].astype(np.int64)):
            runs.append(scored(run, pred, run.get("k", base.k)))
    x = None if args.rescore else engine.device_images(images, device)
    for seed in [] if args.rescore else args.seeds:
        for values in grid_values(space):
            cfg = trial_config(base, {**values, "seed": seed})
            t0 = time.perf_counter()
            model = engine.fit(images, cfg, device=device, log=lambda s: None)
            pred = predict_all(model, x)[0].argmax(1).cpu().numpy()
            preds.append(pred.astype(np.int16))
            run = {"seed": seed, **{key: getattr(cfg, key) for key in values},
                   "seconds": round(time.perf_counter() - t0, 1)}
            runs.append(scored(run, pred, cfg.k))

    picks = []
    for seed in sorted({r["seed"] for r in runs}):
        mine = [r for r in runs if r["seed"] == seed]
        best = max(r["acc"] for r in mine)
        for rule in PICKS:
            chosen = max(mine, key=lambda r: r[rule])
            picks.append({"seed": seed, "rule": rule, "chosen": {k: chosen[k] for k in space},
                          "chosen_acc": chosen["acc"], "best_acc": best, "gap": round(best - chosen["acc"], 4)})
    print()
    print_table(runs, ["seed", *space, "modularity", "silhouette", "evenness", "clusters_used", "acc", "seconds"])
    print()
    print_table(picks, ["seed", "rule", "chosen", "chosen_acc", "best_acc", "gap"])
    for rule in PICKS:
        gaps = [q["gap"] for q in picks if q["rule"] == rule]
        rho = spearmanr([r[rule] for r in runs], [r["acc"] for r in runs])[0]
        print(f"{rule}: mean gap to the best ACC {np.mean(gaps):.4f} (max {np.max(gaps):.4f}); "
              f"rank correlation with ACC over all runs {rho:.3f}")
    write_json(args.out, {"data": args.data, "n": len(images), "space": space, "config": base.model_dump(mode="json"),
                          "device": str(device), "runs": runs, "picks": picks})
    if args.predictions and preds:  # row i holds the clusters of runs[i]
        keep = [{key: r[key] for key in ("seed", *space, "seconds")} for r in runs]
        np.savez_compressed(args.predictions, clusters=np.stack(preds), runs=json.dumps(keep))


if __name__ == "__main__":
    main()
