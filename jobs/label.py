"""Label job: Ray Data decodes every shard in CPU tasks and labels it in an actor pool holding the trained model
(GPU when present), which writes one Parquet part per shard; then `_SUCCESS.json`.

Re-running with the same arguments finishes only the shards whose part is missing (docs/DESIGN.md §6).
"""
from __future__ import annotations

import json
import time
import uuid

import numpy as np
import ray
import torch

from clustering import engine, lease
from clustering.data import assignments, features, shards, storage
from clustering import checkpoints
from clustering.config import LabelConfig, TrainConfig
from clustering.estimator import DeepClusterer

from .decode import decode_memory, decode_shard, read_cached, shard_rows
from .progress import pool_bar
from .runtime import check_pool, chunks, want_gpu


class ShardLabeler:
    """One actor of the pool: loads the model once, then labels decoded shards and writes one part per shard."""

    def __init__(self, checkpoint: str, cfg: dict, gpu: bool, writer: dict):
        self.cfg, self.writer = LabelConfig(**cfg), writer
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(self.cfg.cpus_per_actor)
        self.model = DeepClusterer.load(checkpoint, device=device)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for uri, name, index, keys, sources, skipped, images in zip(
                batch["shard"], batch["name"], batch["index"], batch["keys"], batch["sources"], batch["skipped"],
                batch["images"]):
            keys, skipped = json.loads(str(keys)), json.loads(str(skipped))
            if len(set(keys)) != len(keys):  # unique within a shard; the manifest holds them unique across shards
                raise RuntimeError(f"{uri} holds a key twice: re-run dicl shard, which refuses such a corpus")
            if len(keys) and images.ndim == 2:  # a frozen backbone's features, from the cache
                probs, z = self.model.posteriors_of_features(np.ascontiguousarray(images), self.cfg.batch_size)
            elif len(keys):
                probs, z = self.model.posteriors(np.ascontiguousarray(images), self.cfg.batch_size)
            else:  # every image of the shard was skipped: its part still says so
                probs, z = np.zeros((0, self.writer["k"]), np.float32), np.zeros((0, 1), np.float32)
            tbl = assignments.table(keys, str(name), probs, z if self.cfg.write_embedding else None,
                                    self.cfg.write_probs, sources=json.loads(str(sources)))
            assignments.write_part(self.cfg.output, int(index), tbl, self.writer, skipped)
            rows.append(len(keys) + len(skipped))
        return {"shard": batch["shard"], "rows": np.array(rows)}


def label_shards(todo: list[dict], manifest: dict, checkpoint: str, spec: dict, cfg: LabelConfig, gpu: bool,
                 writer: dict, progress: bool = False, cache: str | None = None) -> None:
    """Two Ray Data stages: CPU tasks decode whole shards (at most `label.decoders` at once; Ray Data's streaming
    executor bounds the queue between the stages), and an actor pool holding the model labels them, a shard at a
    time in batches of label.batch_size, so the device waits on no decoding."""
    mode, side = shards.image_spec(manifest, spec["side"], spec["channels"])  # the policy at the model's input
    ray.data.DataContext.get_current().raise_original_map_exception = True  # a StaleShard, not "UDF failed"
    ds = ray.data.from_items(shard_rows(cfg.shards, todo), override_num_blocks=len(todo))
    memory = decode_memory(manifest, spec["channels"], side)  # also keeps each stage apart from the actors
    if cache:  # a frozen backbone's run, whose features of these shards are cached: read them, decode nothing
        ds = ds.map_batches(read_cached, batch_size=1, num_cpus=1, memory=memory, concurrency=cfg.decoders,
                            fn_kwargs={"base": cache})
    else:
        ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=1, memory=memory, concurrency=cfg.decoders,
                            fn_kwargs={"mode": mode, "side": side})
    ds = ds.map_batches(
        ShardLabeler, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(todo))),
        num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cfg.cpus_per_actor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "cfg": cfg.model_dump(mode="json"), "gpu": gpu,
                               "writer": writer},
    )
    with pool_bar(sum(e["samples"] for e in todo), "label", progress) as bar:
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
    if unlisted := shards.unlisted_shards(cfg.shards, manifest):
        raise shards.StaleShard(f"{unlisted[0]} ({len(unlisted)} tars in all) lies beside the shards but is not in "
                                f"its {shards.MANIFEST}: the manifest was edited or is not this folder's. Re-run dicl "
                                "shard, which writes both again")
    with lease.hold(cfg.output, "dicl label"):
        return label_corpus(cfg, checkpoint, state, manifest, progress)


FOOTERS_PER_TASK = 500  # parts whose footers one task reads: ~50 ms of requests each on S3, so a task runs seconds


@ray.remote(num_cpus=0.25)
def _footer_totals(uris: list[str], writer: dict) -> dict:
    return assignments.totals(uris, writer)


@ray.remote(num_cpus=0.25)
def _footer_writers(uris: list[str]) -> list[dict]:
    return [assignments.part_writer(u) for u in uris]


def part_writers(uris: list[str]) -> list[dict]:
    """The writer of each part, its footer read by tasks of FOOTERS_PER_TASK parts."""
    return [w for ws in ray.get([_footer_writers.remote(g) for g in chunks(uris, FOOTERS_PER_TASK)]) for w in ws]


def complete(cfg: LabelConfig, manifest: dict, writer: dict) -> dict:
    """The label run's totals, added up from the parts' footers in parallel tasks (no row is read): every shard of
    the manifest has its part, every part is this run's, and rows plus skipped images are the corpus' samples.
    Keys are unique by construction: each part checks its shard's keys, and the manifest holds them unique across
    shards. Otherwise an error says what is wrong, and `_SUCCESS.json` is not written."""
    uris = [assignments.part_uri(cfg.output, e) for e in manifest["shards"]]
    present = set(storage.list_files(cfg.output, ".parquet"))
    missing = [u for u in uris if u not in present]
    if missing:
        raise RuntimeError(f"{cfg.output} lacks {len(missing):,} of its {len(uris):,} parts (e.g. {missing[0]}): "
                           f"not writing {assignments.SUCCESS}. Re-run dicl label.")
    total = assignments.no_totals()
    for part in ray.get([_footer_totals.remote(g, writer) for g in chunks(uris, FOOTERS_PER_TASK)]):
        total = assignments.add_totals(total, part)
    if total["foreign"]:
        raise RuntimeError(f"{total['foreign'][0]} is not this run's part: another run wrote into {cfg.output}. "
                           "Re-run dicl label.")
    if total["uncounted"]:  # parts of an earlier release, with no counts in their footers: read their rows once
        table = assignments.read_parts(total["uncounted"], ["cluster"])
        extra = np.bincount(table["cluster"].to_numpy(), minlength=writer["k"]).tolist()
        total = assignments.add_totals(total, {**assignments.no_totals(), "parts": len(total["uncounted"]),
                                               "rows": len(table), "counts": extra})
    if total["rows"] + total["skipped"] != manifest["num_samples"]:  # the input's fault: exit 2
        raise storage.StorageError(f"{cfg.output}'s parts hold {total['rows']:,} labelled images and {total['skipped']:,} "
                           f"skipped, where {cfg.shards}/{shards.MANIFEST} counts {manifest['num_samples']:,}: the "
                           "manifest does not describe its shards (edited, or the shards changed without it). Not "
                           f"writing {assignments.SUCCESS}: re-run dicl shard, then dicl label")
    return total


def feature_cache(state: dict, manifest: dict, shards_uri: str) -> str | None:
    """A feature cache of these shards by the run's frozen backbone (the run's train.features, or the one beside
    these shards), whose fingerprint matches the checkpoint's backbone; None: decode the images."""
    spec = state["spec"]
    cfg = TrainConfig.of_spec(spec["config"])
    if not cfg.frozen_backbone:
        return None
    backbone = None
    for base in dict.fromkeys([cfg.feature_cache, storage.join(shards_uri, "features")]):
        cache = features.read_manifest(base)
        if cache is None or cache["content_hash"] != manifest["content_hash"]:
            continue
        if backbone is None:
            _, model = engine.build_from_spec(spec)
            model.load_state_dict(state["model"])
            backbone = model.backbone
        if backbone.fingerprint(spec["channels"], spec["side"]) == cache["fingerprint"]:
            return base
    return None


def input_warnings(spec: dict, manifest: dict) -> list[str]:
    """What the summary should say when the corpus is not what the model was trained on."""
    side, channels = shards.corpus_side(manifest), manifest["image"]["channels"]
    trains_at = TrainConfig.of_spec({**spec["config"], "image_size": None}).side_for(side)  # a method's least side
    if (spec["side"], spec["channels"]) == (trains_at, channels):
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
    entries = manifest["shards"]
    done = {shards.name_of(p) for p in assignments.start_run(cfg.output, writer, part_writers)}
    todo = [e for e in entries if assignments.part_name(shards.part_index(e)) not in done]
    if len(todo) < len(entries):
        print(f"label: {len(entries) - len(todo)} of {len(entries)} shards already labelled at {cfg.output}; doing the rest")
    warnings = input_warnings(spec, manifest)
    t0 = time.perf_counter()
    gpu = want_gpu(cfg.use_gpu)
    if todo:
        check_pool("label", min(cfg.actors, len(todo)), cfg.cpus_per_actor, gpu)
        cache = feature_cache(state, manifest, cfg.shards)
        if cache:
            print(f"label: reading the run's backbone's features from the cache {cache}: no image is decoded")
        label_shards(todo, manifest, checkpoint, spec, cfg, gpu, writer, progress, cache)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    total = complete(cfg, manifest, writer)
    counts = {i: n for i, n in enumerate(total["counts"]) if n}
    if total["skipped"]:
        warnings.append(f"skipped {total['skipped']:,} images that did not decode, e.g. {total['skipped_examples'][0]}")
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
        "rows": total["rows"],
        "expected_rows": manifest["num_samples"],
        "skipped": {"count": total["skipped"], "examples": total["skipped_examples"]},
        "counts": counts,
        "warnings": warnings,
        "seconds": seconds,
        "completion_seconds": time.perf_counter() - t1,
        "images_per_second": sum(e["samples"] for e in todo) / seconds if todo else None,
    }
    assignments.write_success(cfg.output, info)
    return info


def describe(info: dict, output: str) -> str:
    """What `dicl label` prints at the end: where the output is, and what it holds."""
    return assignments.describe_run(info, output, "labelled", "images that did not decode")
