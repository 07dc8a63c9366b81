"""shard -> tune (when tune.space names keys) -> train -> label -> report, on whatever Ray the environment gives
(local or a cluster)."""
from __future__ import annotations

import time

import numpy as np

from clustering import lease, report
from clustering.data import shards, storage
from clustering.config import PipelineConfig, trial_config
from clustering.estimator import DeepClusterer

from .features import describe as features_line, run_features
from .label import run_label
from .shard import describe, run_shard
from .train import run_train
from .tune import format_table, run_tune


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Every stage, holding work_dir's lock: a second pipeline into the same work_dir is refused."""
    with lease.hold(cfg.work_dir, "dicl pipeline"):
        return stages(cfg, progress)


def stages(cfg: PipelineConfig, progress: bool) -> dict:
    t0 = time.perf_counter()
    cached = cfg.train.frozen_backbone
    steps = 4 + bool(cfg.tune.space) + cached
    print(f"[1/{steps}] shard {cfg.shard.source} -> {cfg.shard.output}", flush=True)
    manifest = run_shard(cfg.shard, progress=progress)
    print(describe(manifest, cfg.shard.output), flush=True)

    if cached:
        print(f"[2/{steps}] features of {cfg.train.encoder} -> {cfg.train.feature_cache}", flush=True)
        print(features_line(run_features(cfg.train, cfg.label, progress=progress), cfg.train.feature_cache), flush=True)

    if cfg.tune.space:
        print(f"[{2 + cached}/{steps}] tune {', '.join(sorted(cfg.tune.space))} without labels ({cfg.tune.metric})", flush=True)
        tuned = run_tune(cfg)
        print(format_table(tuned), flush=True)
        cfg = cfg.model_copy(update={"train": trial_config(cfg.train, tuned["best"])})

    print(f"[{steps - 2}/{steps}] train {cfg.train.method.name} (k={cfg.train.k}) on {cfg.train.num_workers} worker(s)", flush=True)
    trained = run_train(cfg.train, progress=progress)
    print(f"trained in {trained.seconds:.0f}s; checkpoint {trained.checkpoint}", flush=True)

    print(f"[{steps - 1}/{steps}] label -> {cfg.label.output}", flush=True)
    info = run_label(cfg.label, checkpoint=trained.checkpoint, progress=progress)

    print(f"[{steps}/{steps}] report", flush=True)
    summary, html = write_report(cfg, trained, tuned if cfg.tune.space else None)
    summary.update(run=trained.name, checkpoint=trained.checkpoint, seconds=round(time.perf_counter() - t0, 1),
                   assignments=cfg.label.output, report=html, labelled_rows=info["rows"], warnings=info["warnings"])
    print(format_summary(summary), flush=True)
    return summary


def write_report(cfg: PipelineConfig, trained, trials: dict | None, embedded: int = 2000) -> tuple[dict, str]:
    """The report of a labelled run under work_dir/report; `trials`: the tune job's (metric, trials), where it ran.
    Returns (its summary, the page's URI)."""
    shards_uri, output = cfg.label.shards, cfg.label.output
    seen = report.sample(output, shards_uri)  # read once: the score, the pictures and the embedding look at them
    model = DeepClusterer.load(trained.checkpoint, device="cpu")
    summary = report.summarize(output, shards_uri, seen, deskew=model.config_.deskew)  # the run's own graph
    views = report.cluster_views(output, shards_uri, seen)
    confusion = report.add_composition(views, output, shards_uri, seen)
    n = len(seen.data.images)  # the embedding: a seeded draw across the sampled shards, not the first shard's images
    drawn = np.sort(np.random.default_rng(0).choice(n, min(n, embedded), replace=False))
    probs, codes = model.posteriors(seen.data.images[drawn])
    mode, side = shards.image_spec(shards.read_manifest(shards_uri), model.image_size_, model.channels_)
    run = {"method": model.method, "k": model.config_.k, "run": trained.name, "image_size": model.image_size_,
           "assignments": report.shown(output, cfg.work_dir), "checkpoint": report.shown(trained.checkpoint, cfg.work_dir)}
    page = report.Report(summary, views, run, model.history_, report.policy_chart(shards_uri, mode, side),
                         report.embedding_map(codes, probs.argmax(1), probs.max(1), [seen.data.keys[i] for i in drawn],
                                              seen.data.images[drawn]), confusion, trials)
    return summary, report.write(storage.join(cfg.work_dir, "report"), page)


def format_summary(s: dict) -> str:
    sizes = " ".join(f"{k}:{v}" for k, v in s["cluster_sizes"].items())
    lines = [
        "",
        f"Summary ({s['seconds']:.0f}s)",
        f"  images labelled  {s['rows']:,} (expected {s['expected_rows']:,}"
        + (f", {s['skipped']:,} skipped" if s.get("skipped") else "") + ")",
        f"  cluster sizes    {sizes}",
        f"  on a sample of   {s['sample_rows']:,} images ({s['sample_shards']} shards, seeded):",
        f"  mean confidence  {s['mean_confidence']:.3f}",
        f"  modularity       {s['modularity']:.3f} (label-free: clusters keep images with their 10 nearest; 0 chance, 1 all)",
    ]
    if "acc" in s:
        lines.append(f"  vs labels        ACC {s['acc']:.4f}  NMI {s['nmi']:.4f}  ARI {s['ari']:.4f}  ({s['scored_rows']:,} labelled images)")
    lines += [f"  assignments      {s['assignments']}", f"  report           {s['report']}", f"  checkpoint       {s['checkpoint']}"]
    lines += [f"  warning          {w}" for w in s.get("warnings", [])]
    return "\n".join(lines)
