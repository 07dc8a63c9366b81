"""Do views help merge fine clusters? Trains a method as quality.py does, and where the run merges its fine clusters
into k, merges the same fine clusters again with the links of their views at several weights (engine.MERGE_VIEWS
seeded views of each sampled image; W links in all per image, spread over its views that leave its fine cluster;
0 = the pixel graph alone). ACC over every image for each weight, with the fine clusters' purity (the best any merge
can reach) and how often a view, or a pixel link, that leaves its fine cluster stays in its class (by labels).
Where train.restarts > 1 each start merges too: a run's row is its own (last) merge. `--dump DIR` keeps each run's
merge inputs (DIR/seed<N>.npz), to try other merges offline without training again.

    python benchmarks/merge_views.py --data ../.data/mnist --config ../configs/mnist.yaml --limit 10000 \
        --imbalance 5 --seeds 0 1 2 --set train.restarts=1 train.joint_epochs=20

Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from runner import at_side, device, finish, load_arrays, parser, variant, variant_arguments

from clustering import engine, metrics
from clustering.config import PipelineConfig, load_config, trial_config
from clustering.model.methods import fine_proba

WEIGHTS = (0.0, 1.0, 2.0, 4.0)  # links from views per image; engine.MERGE_VIEW_LINKS is the run's own


def leaving_same_class(clusters: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> float:
    """Of the links from each sampled image (clusters (S,)) to fine clusters targets (S, L) that leave its own, the
    share that reach a fine cluster whose majority class is the image's."""
    majority = np.full(clusters.max(initial=targets.max()) + 1, -1)
    for c in np.unique(clusters):
        majority[c] = np.bincount(labels[clusters == c]).argmax()
    leaving = targets != clusters[:, None]
    return float((majority[targets] == labels[:, None])[leaving].mean()) if leaving.any() else float("nan")


def merges_at_every_weight(labels: np.ndarray, last: dict):
    """A stand-in for engine.merge_fine_clusters that scores the merge at every weight into `last` (replaced by each
    start's merge too, where train.restarts > 1, so the run's own is left), then sets the run's merge from the same
    sample. The row keeps the merge's inputs under "inputs", for `--dump`."""
    def merge(model, cfg, x, comm, most=engine.MERGE_SAMPLE):
        scores, fine = engine.merge_sample(model, cfg, x, comm, most)
        proba = fine_proba(engine.trainee(model), engine.features_of(model, x)).cpu().numpy()
        every = proba.argmax(1)
        sample = metrics.sample_index(len(x), most)[scores.index]  # one process: rank 0's sample, graph order
        sampled = labels[sample]
        views = fine[:, 1:]  # none where the method does not train views to agree (dcec): the merge reads no views
        row = {"seed": cfg.seed, "fine_purity": round(purity(every, labels), 4),
               "views_staying": round(float((views == fine[:, :1]).mean()), 3) if views.size else None,
               "leaving_views_same_class": round(leaving_same_class(fine[:, 0], views, sampled), 3) if views.size
               else None,
               "leaving_pixel_links_same_class": round(leaving_same_class(fine[:, 0], fine[:, 0][scores.graph()],
                                                                          sampled), 3)}
        for w in WEIGHTS:
            m = metrics.merge_by_modularity(scores.graph(), fine[:, 0], cfg.fine_k, cfg.k, views=fine[:, 1:],
                                            view_links=w)
            row[f"acc_w{w:g}"] = round(metrics.scores(labels, m[every])["acc"], 4)
        last.clear()
        last.update(row, inputs=dict(labels=labels, proba=proba, sample=sample, graph=scores.graph(), fine=fine,
                                     points=scores.points, k=cfg.k))
        print(row, flush=True)
        return engine.set_merge(model, cfg, scores, fine)
    return merge


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """The share of images in their cluster's majority class: the best ACC any merge of these clusters can reach."""
    return float(sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels))


def main() -> None:
    p = parser(__doc__, "results/merge-views.json", config=True)
    p.add_argument("--method", default=None, help="the method; default the config's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--dump", type=Path, default=None, help="a folder for each run's merge inputs (seed<N>.npz: "
                   "labels, fine posteriors, the sample, its graph, its and its views' fine clusters, its points)")
    variant_arguments(p)
    args = p.parse_args()

    base = load_config(PipelineConfig, args.config, args.set).train
    images, labels = variant(*load_arrays(args.data, args.limit), args, base.image_size)
    last: dict = {}
    engine.merge_fine_clusters = merges_at_every_weight(labels, last)
    found = []
    for seed in args.seeds:
        cfg = trial_config(base, {"seed": seed, **({"method": args.method} if args.method else {})})
        if cfg.fine_k == cfg.k:
            raise SystemExit(f"{cfg.method.name} learns k clusters directly here: set train.over_cluster > 1")
        engine.fit(at_side(images, cfg), cfg, device=device(), log=lambda s: None)
        run = dict(last)  # the run's own merge, after any starts'
        inputs = run.pop("inputs")
        if args.dump is not None:
            args.dump.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.dump / f"seed{seed}.npz", **inputs)
        found.append({**run, "seed": seed})
    means = {key: round(float(np.mean([r[key] for r in found])), 4) for key in found[0]
             if key != "seed" and found[0][key] is not None}
    finish(args.out, {"data": args.data, "n": len(images), "imbalance": args.imbalance, "draw": args.draw,
                      "messy": args.messy, "method": cfg.method.name, "weights": WEIGHTS,
                      "runs": found, "mean": means},
           (found + [{"seed": "mean", **means}], ["seed", "fine_purity", *(f"acc_w{w:g}" for w in WEIGHTS),
                                                   "views_staying"]))


if __name__ == "__main__":
    main()
