"""Label-free selection benchmark: how good is the trial the tune job would pick, against the best by labels?

    python benchmarks/selection.py --config configs/demo.yaml --space "{k: [6, 8, 10, 12, 14, 16]}" --seeds 0 1

Trains every combination of --space (the syntax of `tune.space`) for each seed, in this process, and scores each
run with the tune job's label-free scores (clustering.metrics.LabelFreeScores; a run that learnt a representation,
any method with train.method.contrast_epochs or started from one with train.representation_from, on its own
features' neighbours, with their purity beside) and with ACC. With --set train.representation_from=CKPT (a
quality.py --checkpoint file of a run with train.joint_epochs=0) every run clusters from that one representation. For each seed it shows the run each score picks and its ACC against the best ACC among the runs
(docs/DESIGN.md §5: within 0.02, and k = 10 found among 6..16 on MNIST). Prints a table and writes JSON. Not part of
the test suite.

--imbalance R and --messy score the choice on quality.py's variants of the data (classes at 1x..Rx frequency;
mixed sizes, tints and JPEG quality).

--predictions keeps every run's clusters (.npz); --rescore scores such a file again with the current label-free
scores, without training, to compare a new score on the same runs.

--along also records each run's `tune.metric` every `tune.report_every` epochs, as a tune trial reports it, and
replays those reports through the tune job's ASHA scheduler (Ray Tune's own code, `tune.scheduler=asha`) in every
order of the trials (up to --orders of them) and for each of --graces: how often ASHA picks the trial that training
every trial to the end picks, its ACC gap, and the share of epochs it trains.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from runner import (at_side, device, finish, load_arrays, parser, print_table, variant, variant_arguments,
                    write_json)
from scipy.stats import spearmanr

from clustering import engine, metrics
from clustering.config import (
    PipelineConfig,
    TuneConfig,
    grid_values,
    load_config,
    trial_config,
)
from clustering.model.methods import predict_all

# stability needs the model: not in --rescore
PICKS = ("modularity", "modularity_x_evenness", "silhouette", "evenness", "stability")


def arguments():
    p = parser(__doc__, "results/selection.json", config=True)
    p.add_argument("--space", default=None, help='train values to try, e.g. "{k: [8, 10, 12]}"')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--limit", type=int, default=None, help="first N images only (quick checks)")
    p.add_argument("--subset", type=int, default=None, help="N images drawn at random (seed 0): for folders listed "
                                                              "class by class, where --limit keeps the first classes")
    variant_arguments(p)
    p.add_argument("--sample", type=int, default=10_000, help="images the label-free scores are measured on")
    p.add_argument("--predictions", default=None, help="also write every run's clusters here (.npz), to study scores")
    p.add_argument("--rescore", nargs="*", default=[], help="--predictions files: score their runs again instead of "
                                                             "training (same --data, --limit and --space)")
    p.add_argument("--along", action="store_true", help="record each run's score along it and replay ASHA on it "
                                                        "(tune.report_every, tune.grace_epochs via --set)")
    p.add_argument("--orders", type=int, default=720, help="--along: trial orders replayed per seed (at most)")
    p.add_argument("--graces", type=int, nargs="*", default=[], help="--along: tune.grace_epochs values to replay "
                                                                      "(0 = half the longest run)")
    p.add_argument("--replay", default=None, help="a JSON this script wrote with --along: replay ASHA on its runs "
                                                  "again (other --graces), without training")
    return p


def main() -> None:
    args = arguments().parse_args()
    if args.replay:
        saved = json.loads(Path(args.replay).read_text())
        saved["asha"] = asha_replays(saved["runs"], TuneConfig(**saved["tune"]),
                                     args.graces or [saved["tune"]["grace_epochs"]], args.orders)
        return write_json(args.out, saved)
    if args.space is None:
        raise SystemExit("--space is required (unless --replay)")
    pipeline = load_config(PipelineConfig, args.config, args.set)
    space = yaml.safe_load(args.space)
    images, labels = variant(*load_arrays(args.data, args.limit, args.subset), args, pipeline.train.image_size)
    images = at_side(images, pipeline.train)  # every run at the base config's side
    print(f"{args.data}: {images.shape} on {device()}", flush=True)
    score = Scorer(metrics.LabelFreeScores(images, args.sample, deskew=pipeline.train.deskew), labels)  # one graph
    runs, preds = rescored(args.rescore, score, pipeline.train.k) if args.rescore else \
        trained(args, pipeline, space, images, score)
    picks = pick_rows(runs, space)
    replays = asha_replays(runs, pipeline.tune, args.graces or [pipeline.tune.grace_epochs], args.orders) \
        if args.along else []
    finish(args.out, {"data": args.data, "n": len(images), "imbalance": args.imbalance, "draw": args.draw,
                      "messy": args.messy, "space": space, "device": str(device()), "runs": runs,
                      "config": pipeline.train.model_dump(mode="json"), "tune": pipeline.tune.model_dump(mode="json"),
                      "picks": picks, "asha": replays},
           (runs, ["seed", *space, *rules_in(runs), "clusters_used", "acc", "seconds"]),
           (picks, ["seed", "rule", "chosen", "chosen_acc", "best_acc", "gap"]))
    for rule in rules_in(runs):
        gaps = [q["gap"] for q in picks if q["rule"] == rule]
        rho = spearmanr([r[rule] for r in runs], [r["acc"] for r in runs])[0]
        print(f"{rule}: mean gap to the best ACC {np.mean(gaps):.4f} (max {np.max(gaps):.4f}); "
              f"rank correlation with ACC over all runs {rho:.3f}")
    if args.predictions and preds:  # row i holds the clusters of runs[i]
        keep = [{key: r[key] for key in ("seed", *space, "seconds")} for r in runs]
        np.savez_compressed(args.predictions, clusters=np.stack(preds), runs=json.dumps(keep))


class Scorer:
    """A run's label-free scores (the tune job's) and its ACC, added to its row, which is printed."""

    def __init__(self, scores: metrics.LabelFreeScores, labels: np.ndarray):
        self.scores, self.labels = scores, labels

    def __call__(self, run: dict, pred: np.ndarray, k: int, view_pred: np.ndarray | None = None,
                 scores: metrics.LabelFreeScores | None = None) -> dict:
        """scores: the run's own (on its learnt representation's neighbours), else the pixels' shared ones."""
        scores = scores or self.scores
        found = {**scores(pred, k, view_clusters=view_pred), "acc": metrics.cluster_acc(self.labels, pred)}
        if scores.space == "representation":  # for information: how often those neighbours share a class
            found["neighbour_purity"] = scores.purity(self.labels)
        out = {**run, **{key: round(v, 4) for key, v in found.items()}}
        print("  " + " ".join(f"{key} {v}" for key, v in out.items()), flush=True)
        return out


def rescored(paths: list[str], score: Scorer, k: int) -> tuple[list[dict], list]:
    """The runs of --predictions files, scored again (no training)."""
    runs = []
    for path in paths:
        saved = np.load(path)
        for run, pred in zip(json.loads(str(saved["runs"])), saved["clusters"].astype(np.int64)):
            runs.append(score(run, pred, run.get("k", k)))
    return runs, []


def trained(args, pipeline: PipelineConfig, space: dict, images: np.ndarray, score: Scorer) -> tuple[list[dict], list]:
    """Train every point of the space for every seed; (scored rows, each run's clusters)."""
    x, metric = engine.device_images(images, device()), pipeline.tune.metric
    views = engine.views_of(x[torch.from_numpy(score.scores.index).to(x.device)])  # the same views for every run
    runs, preds = [], []
    for seed in args.seeds:
        for values in grid_values(space):
            cfg = trial_config(pipeline.train, {**values, "seed": seed})
            t0, along = time.perf_counter(), []

            def record(epoch: int, state: dict, k=cfg.k, along=along) -> None:
                model = engine.model_now(state, x)
                pred, view_pred = (predict_all(model, v)[0].argmax(1).cpu().numpy() for v in (x, views))
                along.append([epoch, round(score.scores(pred, k, (metric,), view_pred)[metric], 4)])
            on_epoch = engine.while_clustering(cfg, pipeline.tune.report_every, record) if args.along else None
            model = engine.fit(images, cfg, device=x.device, log=lambda s: None, on_epoch=on_epoch)
            preds.append(predict_all(model, x)[0].argmax(1).cpu().numpy().astype(np.int16))
            view_pred = predict_all(model, views)[0].argmax(1).cpu().numpy()
            run = {"seed": seed, **{key: cfg.value(key) for key in values}, "seconds": round(time.perf_counter() - t0, 1)}
            learnt = engine.representation_of(cfg, model, x)  # as the tune job scores: on learnt features
            own = None if learnt is None else metrics.LabelFreeScores(learnt, args.sample)
            run = score(run, preds[-1].astype(np.int64), cfg.k, view_pred, own)
            if args.along:  # epochs tried by the starts before the pick (train.restarts) are not on the epoch axis
                run.update(along=along, epochs=engine.total_epochs(cfg),
                           start_epochs=(cfg.restarts - 1) * cfg.restart_epochs if cfg.restarts > 1 else 0)
            runs.append(run)
    return runs, preds


def rules_in(runs: list[dict]) -> list[str]:
    return [rule for rule in PICKS if rule in runs[0]]


def pick_rows(runs: list[dict], space: dict) -> list[dict]:
    """Per seed and rule: the run the rule picks, its ACC, and the best ACC among the seed's runs."""
    picks = []
    for seed in sorted({r["seed"] for r in runs}):
        mine = [r for r in runs if r["seed"] == seed]
        best = max(r["acc"] for r in mine)
        for rule in rules_in(runs):
            chosen = max(mine, key=lambda r: r[rule])
            picks.append({"seed": seed, "rule": rule, "chosen": {k: chosen[k] for k in space},
                          "chosen_acc": chosen["acc"], "best_acc": best, "gap": round(best - chosen["acc"], 4)})
    return picks


def replay(runs: list[dict], tune_cfg: TuneConfig, order: tuple[int, ...]) -> tuple[int, dict]:
    """Feed the runs' reports to the tune job's ASHA scheduler as Tune would, the trials reaching each epoch in
    `order` (as when they run one after another, or side by side at the same speed). Returns the pick (the finished
    run with the best final score) and the epoch at which each run ended."""
    from ray.tune.schedulers import TrialScheduler

    from jobs.tune import scheduler  # Ray Tune's ASHA, as the tune job builds it

    metric = tune_cfg.metric
    asha = scheduler(tune_cfg.model_copy(update={"scheduler": "asha"}), max(r["epochs"] for r in runs))
    asha.set_search_properties(metric, "max")
    trials = {i: SimpleNamespace(trial_id=str(i)) for i in order}
    for i in order:
        asha.on_trial_add(None, trials[i])
    reports = sorted((epoch, position, i, score) for position, i in enumerate(order)
                     for epoch, score in [*runs[i]["along"], [runs[i]["epochs"], runs[i][metric]]])
    ended: dict[int, int] = {}
    for epoch, _, i, score in reports:
        if i in ended:
            continue
        result = {"epoch": epoch, metric: score}
        action = asha.on_trial_result(None, trials[i], result)
        if epoch == runs[i]["epochs"] or action == TrialScheduler.STOP:
            ended[i] = epoch
            asha.on_trial_complete(None, trials[i], result)
    finished = [i for i in order if ended[i] == runs[i]["epochs"]]
    return max(finished, key=lambda i: runs[i][metric]), ended


def asha_replays(runs: list[dict], tune_cfg: TuneConfig, graces: list[int], max_orders: int) -> list[dict]:
    """Per seed and grace: how often ASHA picks what FIFO picks (the best final score), the ACC gap of its pick to
    the best run by labels, and its epochs against FIFO's (the starts tried before a pick count)."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        mine = [r for r in runs if r["seed"] == seed]
        fifo, best = max(range(len(mine)), key=lambda i: mine[i][tune_cfg.metric]), max(r["acc"] for r in mine)
        orders = list(itertools.islice(itertools.permutations(range(len(mine))), max_orders))
        if len(orders) == max_orders:  # more orders than we replay: a random draw of them instead of the first ones
            rng = np.random.default_rng(seed)
            orders = [tuple(rng.permutation(len(mine))) for _ in range(max_orders)]
        full = sum(r["epochs"] + r["start_epochs"] for r in mine)
        for grace in graces:
            picks, gaps, shares = [], [], []
            for order in orders:
                pick, ended = replay(mine, tune_cfg.model_copy(update={"grace_epochs": grace}), order)
                picks.append(pick == fifo)
                gaps.append(best - mine[pick]["acc"])
                shares.append(sum(ended[i] + mine[i]["start_epochs"] for i in ended) / full)
            rows.append({"seed": seed, "grace_epochs": grace or f"0 ({max(r['epochs'] for r in mine) // 2})",
                         "orders": len(orders), "same_pick_as_fifo": round(float(np.mean(picks)), 3),
                         "fifo_gap": round(best - mine[fifo]["acc"], 4), "asha_gap_mean": round(float(np.mean(gaps)), 4),
                         "asha_gap_max": round(float(np.max(gaps)), 4), "epochs_vs_fifo": round(float(np.mean(shares)), 3)})
    print()
    print_table(rows, ["seed", "grace_epochs", "orders", "same_pick_as_fifo", "fifo_gap", "asha_gap_mean",
                       "asha_gap_max", "epochs_vs_fifo"])
    return rows


if __name__ == "__main__":
    main()
