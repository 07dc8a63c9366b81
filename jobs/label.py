"""Label job: Ray Data decodes every shard in CPU tasks and labels it in an actor pool holding the trained model
(GPU when present), which writes one Parquet part per shard; then `_SUCCESS.json`.

Re-running with the same arguments finishes only the shards whose part is missing (DESIGN.md §6).
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import numpy as np
import ray
import torch
from tqdm import tqdm

from clustering import assignments, lease, shards, storage
from clustering import checkpoints
from clustering.config import LabelConfig
from clustering.estimator import DeepClusterer

from .decode import decode_shard
from .runtime import check_resources, want_gpu


class ShardLabeler:
    """One actor of the pool: loads the model once, then labels decoded shards and writes one part per shard."""

    def __init__(self, checkpoint: str, cfg: dict, gpu: bool, writer: dict):
        self.cfg, self.writer = LabelConfig(**cfg), writer
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(self.cfg.cpus_per_actor)
        self.model = DeepClusterer.load(checkpoint, device=device)

    def __call__(self, batch: dict) -> dict:
        rows, counts = [], []
        for uri, keys, sources, images in zip(batch["shard"], batch["keys"], batch["sources"], batch["images"]):
            keys = json.loads(str(keys))
            probs, z = self.model.posteriors(np.ascontiguousarray(images), self.cfg.batch_size)
            tbl = assignments.table(keys, shards.name_of(uri), probs, z if self.cfg.write_embedding else None,
                                    self.cfg.write_probs, sources=json.loads(str(sources)))
            assignments.write_part(self.cfg.output, shards.shard_index(uri), tbl, self.writer)
            rows.append(len(keys))
            counts.append(np.bincount(probs.argmax(1), minlength=probs.shape[1]))
        return {"shard": batch["shard"], "rows": np.array(rows), "counts": np.stack(counts)}


def label_shards(todo: list[str], manifest: dict, checkpoint: str, spec: dict, cfg: LabelConfig, gpu: bool,
                 writer: dict, progress: bool = False) -> None:
    """Two Ray Data stages: CPU tasks decode whole shards (at most `label.decoders` at once; Ray Data's streaming
    executor bounds the queue between the stages), and an actor pool holding the model labels them, a shard at a
    time in batches of label.batch_size, so the device waits on no decoding."""
    mode, side = shards.image_spec(manifest, spec["side"], spec["channels"])  # the policy at the model's input
    ray.data.DataContext.get_current().raise_original_map_exception = True  # a StaleShard, not "UDF failed"
    sha = shards.digests(manifest)
    ds = ray.data.from_items([{"shard": u, "sha256": sha[shards.name_of(u)]} for u in todo], override_num_blocks=len(todo))
    # A decode task asks for the memory it uses, with Ray Data's 25% headroom: a worker process (~200 MiB with its
    # imports, measured on MNIST: jobs.decode keeps torch out) and its shard twice, read and decoded. It schedules
    # where that fits, and the request (which the actors do not make) keeps Ray Data from fusing the decoding into
    # the actors.
    biggest = max(manifest["shards"], key=lambda s: s["samples"])
    memory = 250 * 2**20 + 2 * (biggest["bytes"] + biggest["samples"] * spec["channels"] * side ** 2)
    ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=1, memory=memory, concurrency=cfg.decoders,
                        fn_kwargs={"mode": mode, "side": side})
    ds = ds.map_batches(
        ShardLabeler, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(todo))),
        num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cfg.cpus_per_actor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "cfg": cfg.model_dump(mode="json"), "gpu": gpu,
                               "writer": writer},
    )
    sizes = {s["name"]: s["samples"] for s in manifest["shards"]}
    with tqdm(total=sum(sizes[shards.name_of(u)] for u in todo), desc="label", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for done in ds.iter_batches(batch_size=None):  # one block a shard, as the actors finish them
            bar.update(int(np.sum(done["rows"])))


def run_label(cfg: LabelConfig, checkpoint: str | None = None, runs: str | None = None, progress: bool = False) -> dict:
    """Label every shard with a finished checkpoint into cfg.output, holding its lock (a second label job into it
    is refused); returns what `_SUCCESS.json` holds. The checkpoint is `checkpoint`, else label.checkpoint (a run or
    checkpoint folder), else the latest finished run under `runs` (train.storage_path)."""
    cfg = cfg.model_copy(update={"shards": storage.absolute(cfg.shards), "output": storage.absolute(cfg.output)})
    if checkpoint or cfg.checkpoint or not runs:
        checkpoint = checkpoints.resolve(storage.absolute(checkpoint or cfg.checkpoint))
    else:
        checkpoint = checkpoints.latest_finished(storage.absolute(runs))
        print(f"label: label.checkpoint is empty: labelling with the latest finished run's checkpoint {checkpoint}")
    state = checkpoints.load_finished(checkpoint)
    manifest = shards.read_manifest(cfg.shards)
    with lease.hold(cfg.output, "dicl label"):
        return label_corpus(cfg, checkpoint, state, manifest, progress)


def input_warnings(spec: dict, manifest: dict) -> list[str]:
    """What the summary should say when the corpus is not what the model was trained on."""
    side, channels = shards.corpus_side(manifest), manifest["image"]["channels"]
    if (spec["side"], spec["channels"]) == (side, channels):
        return []
    kind = {1: "gray", 3: "RGB"}
    return [f"the model was trained at {spec['side']}x{spec['side']} {kind[spec['channels']]}, and this corpus' images "
            f"are {side}x{side} {kind[channels]} by its policy: they were decoded to the model's input "
            f"({shards.POLICY}). Its clusters may not carry over; train on this corpus to be sure."]


def cluster_warnings(counts: dict[int, int], k: int) -> list[str]:
    """What the summary should say when some of the k clusters hold no image."""
    if len(counts) >= k:
        return []
    return [f"only {len(counts)} of the model's {k} clusters hold an image: the rest are empty (a smaller train.k "
            "may fit this corpus better)"]


def label_corpus(cfg: LabelConfig, checkpoint: str, state: dict, manifest: dict, progress: bool = False) -> dict:
    spec = state["spec"]
    writer = {"checkpoint": checkpoint, "content_hash": manifest["content_hash"], "method": spec["method"],
              "k": spec["config"]["k"], "image_size": spec["side"], "channels": spec["channels"],
              "run": spec["config"].get("name"), "label_run": uuid.uuid4().hex}
    uris = shards.shard_uris(cfg.shards, manifest)
    done = {shards.name_of(p) for p in assignments.start_run(cfg.output, writer)}
    todo = [u for u in uris if assignments.part_name(shards.shard_index(u)) not in done]
    if len(todo) < len(uris):
        print(f"label: {len(uris) - len(todo)} of {len(uris)} shards already labelled at {cfg.output}; doing the rest")
    warnings = input_warnings(spec, manifest)
    t0 = time.perf_counter()
    gpu = want_gpu(cfg.use_gpu)
    if todo:
        check_resources(f"label ({cfg.actors} actors)", {"GPU": 1} if gpu else {"CPU": cfg.cpus_per_actor},
                        min(cfg.actors, len(todo)))
        label_shards(todo, manifest, checkpoint, spec, cfg, gpu, writer, progress)
    seconds = time.perf_counter() - t0
    sizes = {s["name"]: s["samples"] for s in manifest["shards"]}
    # Counts come from the parts themselves, so a resumed run reports the whole corpus; every part must be ours.
    table = assignments.read(cfg.output, columns=["key", "cluster"], writer=writer)
    if table["key"].duplicated().any():
        raise RuntimeError(f"{cfg.output}: some keys appear more than once; clear the folder and re-run")
    if len(table) != manifest["num_samples"]:
        raise RuntimeError(f"{cfg.output} holds {len(table):,} labelled images where {cfg.shards} has "
                           f"{manifest['num_samples']:,}: not writing {assignments.SUCCESS}. Re-run dicl label.")
    counts = {int(k): int(v) for k, v in sorted(Counter(table["cluster"]).items())}
    warnings += cluster_warnings(counts, writer["k"])
    for w in warnings:
        print(f"warning: {w}", flush=True)
    info = {
        "run_id": writer["label_run"],
        "checkpoint": checkpoint,
        "method": writer["method"],
        "k": writer["k"],
        "shards": cfg.shards,
        "content_hash": manifest["content_hash"],
        "rows": int(len(table)),
        "expected_rows": manifest["num_samples"],
        "counts": counts,
        "warnings": warnings,
        "seconds": seconds,
        "images_per_second": sum(sizes[shards.name_of(u)] for u in todo) / seconds if todo else None,
    }
    assignments.write_success(cfg.output, info)
    return info
