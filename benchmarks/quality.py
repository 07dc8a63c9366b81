"""Quality benchmark: train a method on a whole data set for several seeds; ACC/NMI/ARI mean ± std, wall time.

    python benchmarks/quality.py --data data/mnist --method dcec --seeds 0 1 2 \
        --config configs/mnist.yaml --set train.joint_epochs=20 --out results/quality-mnist-dcec.json

Scores are on every image given (MNIST: train + test, as the papers). Runs on the GPU when there is one.
Prints a table and writes JSON. Not part of the test suite.

A run of the representation stage alone (train.joint_epochs=0, train.method.contrast_epochs=N) is scored by
k-means on its features, where clustering would start; its --checkpoint file is a train.representation_from for
runs that cluster from it, e.g. selection.py's over k.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from runner import at_side, finish, load_arrays, parser, variant, variant_arguments

from clustering import engine, metrics
from clustering.config import PipelineConfig, TrainConfig, load_config, trial_config
from clustering.model.heads import KMeansHead
from clustering.model.methods import MixtureNet, embed_all, predict_all


def cluster_sizes(pred: np.ndarray, k: int) -> list[float]:
    """Each cluster's share of the images, largest first."""
    return np.round(np.sort(np.bincount(pred, minlength=k))[::-1] / len(pred), 4).tolist()


def learnt_features(cfg: TrainConfig, model, x: torch.Tensor) -> torch.Tensor | None:
    """(N, D) the features of the images x that the model learnt: its representation stage's (where the tune job
    scores), else an NMM net's features (which EM and the instance loss shape); None where it has neither."""
    found = engine.representation_of(cfg, model, x)
    if found is not None:
        return torch.from_numpy(found)
    return embed_all(model, x, fn=model.net.features).cpu() if isinstance(model, MixtureNet) else None


def feature_kmeans(features: torch.Tensor, k: int) -> np.ndarray:
    """k-means clusters of L2-normalised features (cosine, as SimCLR compares them)."""
    h = torch.nn.functional.normalize(features, dim=1)
    return KMeansHead(k, h.shape[1]).fit(h).predict(h).cpu().numpy()


PURITY_SAMPLE = 10_000  # the first images, whose neighbours the purity figures count


def representation_purity(features: torch.Tensor, labels: np.ndarray, n: int = 10, most: int = PURITY_SAMPLE) -> float:
    """The fraction of an image's n nearest images in learnt features (N, D) that share its class (the first
    `most` images): what clustering in the representation can build on (RESULTS: 0.23 in CIFAR-10's pixels)."""
    from clustering.comm import Comm
    from clustering.model import neighbours

    found = neighbours.mine(features[:most], Comm(), n)
    return neighbours.purity(found.cpu().numpy(), labels[:most])


def pixel_purity(x: torch.Tensor, labels: np.ndarray, n: int = 10, most: int = PURITY_SAMPLE) -> float:
    """The same figure in pixel space (Euclidean), for comparison."""
    from clustering.metrics import knn_graph

    pixels = x[:most].flatten(1).float().cpu().numpy() / 255.0
    return float((labels[:most][knn_graph(pixels, n)] == labels[:most, None]).mean())


def score_along(x: torch.Tensor, labels: np.ndarray, every: int, along: list[dict]):
    """An engine on_epoch callback: every `every` epochs, score a copy of the model, print ACC and the cluster
    sizes, largest first, and append them to `along` (how a run gets there, e.g. whether clusters drift apart).
    The clusters are those the run would give if it ended there (for an autoencoder in pretraining, k-means on its
    codes); in the representation stage (contrast_epochs), k-means on the learnt features: what clustering will start
    from."""
    def on_epoch(epoch: int, info: dict, state_fn) -> None:
        if (epoch + 1) % every or (along and along[-1]["epoch"] == epoch + 1):  # (a finished run started again)
            return
        state = state_fn()
        k = state["spec"]["config"]["k"]
        pretrain = info["stage"] == "contrast"  # the representation stage: its clusters are not trained yet
        if pretrain:
            model = engine.model_copy(state, x.device)[1]
            pred = feature_kmeans(learnt_features(TrainConfig.of_spec(state["spec"]["config"]), model, x), k)
        else:
            pred = engine.clusters_now(state, x).cpu().numpy()
        point = {"epoch": epoch + 1, "acc": metrics.scores(labels, pred)["acc"], "cluster_sizes": cluster_sizes(pred, k),
                 **({"of": "k-means on the features"} if pretrain else {})}
        if state["spec"]["config"]["method"].get("heads", 1) > 1 and not pretrain:
            point["head"] = info["head"]  # the sub-head that labels now (NMM's end of epoch reports it)
        along.append(point)
        print(f"    epoch {point['epoch']}: ACC {point['acc']:.4f}" + (f" ({point['of']})" if pretrain else "")
              + f" cluster sizes {point['cluster_sizes']}" + (f" (sub-head {point['head']})" if "head" in point else ""),
              flush=True)
    return on_epoch


def keep_checkpoint(path: Path, every: int, along: list[dict], t0: float, seconds_before: float):
    """An engine on_epoch callback: every `every` epochs and at the end, save the run (with its trajectory and time
    so far) to `path`, atomically, so a run stopped by a time limit continues from there when started again."""
    def on_epoch(epoch: int, info: dict, state_fn) -> None:
        if (epoch + 1) % every and info["stage"] != "final":
            return
        tmp = path.with_suffix(".tmp")
        torch.save({**state_fn(), "along": along, "seconds": seconds_before + time.perf_counter() - t0}, tmp)
        tmp.replace(path)
    return on_epoch


def run(images, labels, cfg, device, progress: bool = False, eval_every: int = 0, checkpoint: Path | None = None) -> dict:
    t0 = time.perf_counter()
    log = (lambda s: print(f"    {s}", flush=True)) if progress else (lambda s: None)
    x = engine.device_images(images, device)
    resume = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint and checkpoint.exists() else None
    along: list[dict] = list(resume.get("along", [])) if resume else []
    seconds_before = resume.get("seconds", 0.0) if resume else 0.0
    callbacks = [score_along(x, labels, eval_every, along) if eval_every else None,
                 keep_checkpoint(checkpoint, cfg.checkpoint_every, along, t0, seconds_before) if checkpoint else None]
    picks: dict = {}  # with train.restarts > 1: each start's modularity and evenness, and the one picked

    def note_pick(epoch: int, info: dict, state_fn) -> None:
        if info.get("representation_only"):  # the run's last epoch: it learnt features, and no clusters
            picks["representation_only"] = True
        if "start_picked" in info:
            picks.update(start_modularity=info["start_modularity"], start_evenness=info["start_evenness"],
                         start_picked=info["start_picked"])
            print(f"    starts' modularity {info['start_modularity']}: continuing start {info['start_picked'] + 1}",
                  flush=True)

    callbacks = [c for c in callbacks if c is not None] + [note_pick]

    def on_epoch(epoch: int, info: dict, state_fn) -> None:
        for c in callbacks:
            c(epoch, info, state_fn)
    model = engine.fit(images, cfg, device=device, log=log, on_epoch=on_epoch, resume=resume)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if picks.get("representation_only"):  # no clusters trained: k-means on its features, where clustering starts
        pred = feature_kmeans(learnt_features(cfg, model, x), cfg.k)
    else:
        pred = predict_all(model, x)[0].argmax(1).cpu().numpy()
    seconds = seconds_before + time.perf_counter() - t0
    features = learnt_features(cfg, model, x[:PURITY_SAMPLE])  # the images the purity reads, not all of them
    purity = {"neighbour_purity": representation_purity(features, labels)} if features is not None else {}
    return {**metrics.scores(labels, pred), "seconds": seconds, "clusters_used": len(np.unique(pred)), **purity,
            "cluster_sizes": cluster_sizes(pred, cfg.k), **picks, **({"along": along} if along else {}),
            **({"resumed_from_epoch": int(resume["epoch"])} if resume else {})}


def mean_std(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def seed_line(method: str, r: dict) -> str:
    purity = f", neighbour purity {r['neighbour_purity']:.3f}" if "neighbour_purity" in r else ""
    return (f"  {method} seed {r['seed']}: ACC {r['acc']:.4f} NMI {r['nmi']:.4f} ARI {r['ari']:.4f} "
            f"({r['seconds']:.0f}s, {r['clusters_used']} clusters used{purity})")


def summarise(method: str, runs: list[dict], config: dict) -> dict:
    return {"method": method, **{k: mean_std(runs, k) for k in ("acc", "nmi", "ari")},
            "seconds": f"{np.mean([r['seconds'] for r in runs]):.0f}", "runs": runs, "config": config}


def seed_command(args: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    """This script, for one method and one seed, with the other options as given."""
    cmd = [sys.executable, __file__, "--data", args.data, "--method", method, "--seeds", str(seed), "--out", str(out),
           "--eval-every", str(args.eval_every)]
    for flag, value in [("--config", args.config), ("--limit", args.limit), ("--sample", args.sample),
                        ("--checkpoint", args.checkpoint)]:
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--imbalance", str(args.imbalance), "--draw", str(args.draw)] if args.imbalance else []
    cmd += ["--messy"] if args.messy else []
    return cmd + (["--progress"] if args.progress else []) + (["--set", *args.set] if args.set else [])


def run_seed_process(args: argparse.Namespace, method: str, seed: int, out: Path, env: dict) -> int:
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        code = subprocess.run(seed_command(args, method, seed, out), stdout=f, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode
    print(f"  {method} seed {seed}: {'done' if code == 0 else f'FAILED (exit {code})'}; log {log}", flush=True)
    return code


def run_seeds_side_by_side(args: argparse.Namespace, methods: list[str]) -> tuple[list[dict], str, int]:
    """One process per seed, `args.jobs` at a time (they share the GPU, or split the CPU cores); each writes its
    log and JSON next to `args.out`. Returns the merged rows, the device name and the image count."""
    stem = Path(args.out).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():  # split the cores rather than oversubscribe them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    rows, device, n = [], "", 0
    for method in methods:
        outs = [Path(f"{stem}-{method}-seed{seed}.json") for seed in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(partial(run_seed_process, args, method, env=env), args.seeds, outs))
        if any(codes):
            raise SystemExit(f"{sum(c != 0 for c in codes)} of {len(codes)} {method} runs failed: see their logs")
        parts = [json.loads(out.read_text()) for out in outs]
        runs = [r for part in parts for r in part["results"][0]["runs"]]
        for r in runs:
            print(seed_line(method, r), flush=True)
        rows.append(summarise(method, runs, parts[0]["results"][0]["config"]))
        device, n = parts[0]["device"], parts[0]["n"]
    return rows, device, n


def run_in_this_process(args: argparse.Namespace, base, methods: list[str]) -> tuple[list[dict], str, int]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    images, labels = load_arrays(args.data, args.limit, args.sample)
    images, labels = variant(images, labels, args, base.image_size)
    print(f"{args.data}: {images.shape} on {device}", flush=True)
    known = labels >= 0
    pixels = pixel_purity(torch.from_numpy(images[known]).permute(0, 3, 1, 2), labels[known]) if known.any() else None
    if pixels is not None:
        print(f"  neighbour purity in pixels: {pixels:.3f} (an image's 10 nearest sharing its class)", flush=True)
    rows = []
    for method in methods:
        runs = []
        for seed in args.seeds:
            cfg = trial_config(base, {"method": method, "seed": seed})
            checkpoint = Path(args.checkpoint) / f"{method}-seed{seed}.pt" if args.checkpoint else None
            if checkpoint:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
            r = run(at_side(images, cfg), labels, cfg, device, args.progress, args.eval_every, checkpoint)
            runs.append({"seed": seed, **r})
            print(seed_line(method, runs[-1]), flush=True)
        rows.append({**summarise(method, runs, cfg.model_dump(mode="json")), "pixel_neighbour_purity": pixels})
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()}"
    return rows, hardware, len(images)


def main() -> None:
    p = parser(__doc__, "results/quality.json", config=True)
    p.add_argument("--method", action="append", help="method(s) to run (repeatable); default: the config's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=None, help="first N images only (quick checks)")
    p.add_argument("--sample", type=int, default=None, help="N images drawn at random (seed 0): for folders listed "
                   "class by class, where --limit would keep the first classes only")
    variant_arguments(p)
    p.add_argument("--progress", action="store_true", help="print a line per epoch (loss, seconds)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="score ACC and print cluster sizes every N epochs (the time includes it)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save each run to DIR every train.checkpoint_every epochs; a run whose file is there "
                        "continues from it (runs longer than one time limit; a finished run is only scored)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run the seeds as N processes side by side (sharing one GPU, or splitting the CPU cores); "
                        "each keeps a log and JSON next to --out, which gets the merged table")
    args = p.parse_args()

    base = load_config(PipelineConfig, args.config, args.set).train
    methods = args.method or [base.method.name]
    if args.jobs > 1 and len(args.seeds) > 1:
        rows, hardware, n = run_seeds_side_by_side(args, methods)
    else:
        rows, hardware, n = run_in_this_process(args, base, methods)
    finish(args.out, {"data": args.data, "n": n, "imbalance": args.imbalance, "draw": args.draw, "messy": args.messy,
                      "device": hardware, "results": rows},
           (rows, ["method", "acc", "nmi", "ari", "seconds"]))


if __name__ == "__main__":
    main()
