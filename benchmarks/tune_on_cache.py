"""Tune on the feature cache: Optuna trials over k and the loss weights on a frozen backbone's cached features, beside
trials of the same search on the pixels (the conv net), on a local Ray of --cpus CPUs.

    python benchmarks/tune_on_cache.py --data MNIST_DIR --limit 10000 --trials 100 --pixel-trials 4

The backbone is a torchvision ResNet-18 with weights made here (seeded; no download): the time per trial does not
depend on what the weights learnt, the quality does, so no quality figure is reported. Prints a table and writes
JSON. Not part of the test suite.
"""
from __future__ import annotations

import tempfile
import time

import torch
from runner import device_name, finish, local_ray, parser

from clustering.config import PipelineConfig, load_config
from clustering.model.backbones import import_torchvision

SPACE = "{k: {randint: [5, 21]}, consistency_weight: {uniform: [0.1, 2.0]}, instance_weight: {uniform: [0.0, 1.0]}}"


def run_search(work: str, overrides: list[str], trials: int) -> dict:
    from jobs.tune import run_tune

    cfg = load_config(PipelineConfig, "configs/pretrained.yaml", overrides + [
        f"work_dir={work}", f"tune.space={SPACE}", "tune.search=optuna", f"tune.num_samples={trials}",
        "tune.max_concurrent=2", "train.cpus_per_worker=1"])
    t0 = time.perf_counter()
    result = run_tune(cfg)
    wall = time.perf_counter() - t0
    seconds = sorted(t["seconds"] for t in result["trials"])
    return {"trials": len(result["trials"]), "wall_s": round(wall, 1), "wall_per_trial_s": round(wall / trials, 2),
            "median_trial_s": round(seconds[len(seconds) // 2], 2), "best_k": result["best"].get("k")}


def main() -> None:
    p = parser(__doc__, "results/tune-on-cache.json", data=None)
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--pixel-trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20, help="train.joint_epochs of every trial")
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    from jobs.features import run_features
    from jobs.shard import run_shard

    with tempfile.TemporaryDirectory() as work, local_ray(args.cpus):
        weights = f"{work}/resnet18.pt"
        torch.manual_seed(0)
        torch.save(import_torchvision().models.resnet18().state_dict(), weights)
        common = [f"shard.source={args.data}", f"shard.limit={args.limit}", "shard.samples_per_shard=2500",
                  f"train.joint_epochs={args.epochs}", "train.batch_size=256"]
        cached = common + [f"train.weights={weights}", "train.encoder=torchvision:resnet18", "train.backbone_size=32"]
        cfg = load_config(PipelineConfig, "configs/pretrained.yaml", cached + [f"work_dir={work}"])
        run_shard(cfg.shard)
        t0 = time.perf_counter()
        cache = run_features(cfg.train, cfg.label)
        feature_s = time.perf_counter() - t0
        rows = [{"input": f"cache ({cache['dim']} features)", **run_search(work, cached, args.trials)},
                {"input": "pixels (conv net)", **run_search(work, common + ["train.encoder=conv"], args.pixel_trials)}]
    rows[0]["once_s"] = round(feature_s, 1)  # computing the cache, once, before the trials
    finish(args.out, {"data": args.data, "n": args.limit, "epochs": args.epochs, "space": SPACE,
                      "device": device_name(), "rows": rows}, (rows, None))


if __name__ == "__main__":
    main()
