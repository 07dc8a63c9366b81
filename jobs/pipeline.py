"""shard -> train -> label -> report, on whatever Ray the environment gives (local or a cluster)."""
from __future__ import annotations

import time

from clustering import report, storage
from clustering.config import PipelineConfig

from .label import run_label
from .shard import describe, run_shard
from .train import load_checkpoint, run_train


def run_pipeline(cfg: PipelineConfig, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    print(f"[1/4] shard {cfg.shard.source} -> {cfg.shard.output}", flush=True)
    manifest = run_shard(cfg.shard, progress=progress)
    print(describe(manifest, cfg.shard.output), flush=True)

    print(f"[2/4] train {cfg.train.method} (k={cfg.train.k}) on {cfg.train.num_workers} worker(s)", flush=True)
    trained = run_train(cfg.train)
    print(f"trained in {trained.seconds:.0f}s; checkpoint {trained.checkpoint}", flush=True)

    print(f"[3/4] label -> {cfg.label.output}", flush=True)
    info = run_label(cfg.label, checkpoint=trained.checkpoint)

    print("[4/4] report", flush=True)
    summary = report.summarize(cfg.label.output, cfg.label.shards)
    summary.update(run=trained.name, checkpoint=trained.checkpoint, seconds=round(time.perf_counter() - t0, 1))
    history = load_checkpoint(trained.checkpoint).get("history", [])
    report_dir = storage.join(cfg.work_dir, "report")
    html = report.write_html(report_dir, summary, report.montages(cfg.label.output, cfg.label.shards), history)
    summary.update(assignments=cfg.label.output, report=html, labelled_rows=info["rows"])
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    sizes = " ".join(f"{k}:{v}" for k, v in s["cluster_sizes"].items())
    lines = [
        "",
        f"Summary ({s['seconds']:.0f}s)",
        f"  images labelled  {s['rows']:,} (expected {s['expected_rows']:,}, unique keys {s['unique_keys']:,})",
        f"  cluster sizes    {sizes}",
        f"  mean confidence  {s['mean_confidence']:.3f}",
    ]
    if "acc" in s:
        lines.append(f"  vs labels        ACC {s['acc']:.4f}  NMI {s['nmi']:.4f}  ARI {s['ari']:.4f}  ({s['scored_rows']:,} labelled images)")
    lines += [f"  assignments      {s['assignments']}", f"  report           {s['report']}", f"  checkpoint       {s['checkpoint']}"]
    return "\n".join(lines)
