"""Label job: Ray Data maps every shard through an actor pool holding the trained model (GPU when present)
and writes one Parquet part per shard, then `_SUCCESS.json`.

Re-running with the same arguments finishes only the shards whose part is missing (DESIGN.md §6).
"""
from __future__ import annotations

import time
import uuid
from collections import Counter

import numpy as np
import ray
import torch

from clustering import assignments, shards, storage
from clustering.config import LabelConfig
from clustering.engine import build_from_spec
from clustering.methods import predict_all

from .runtime import want_gpu
from .train import load_checkpoint, resolve_checkpoint


class ShardLabeler:
    """One actor: loads the model once, then reads, decodes, labels and writes whole shards."""

    def __init__(self, checkpoint: str, manifest: dict, cfg: dict, gpu: bool):
        self.cfg = LabelConfig(**cfg)
        state = load_checkpoint(checkpoint)
        self.spec = state["spec"]
        _, self.model = build_from_spec(self.spec)
        self.model.load_state_dict(state["model"])
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.manifest = manifest

    def __call__(self, batch: dict) -> dict:
        rows, counts = [], []
        mode, size = shards.image_spec(self.manifest, self.spec["side"])
        for uri in batch["shard"]:
            name = uri.rsplit("/", 1)[-1]
            data = shards.load_shard(uri, mode, size)
            x = torch.from_numpy(data.images).permute(0, 3, 1, 2).to(self.device)
            probs, z = predict_all(self.model, x, self.cfg.batch_size)
            tbl = assignments.table(data.keys, name, probs.cpu().numpy(),
                                    z.cpu().numpy() if self.cfg.write_embedding else None, self.cfg.write_probs)
            assignments.write_part(self.cfg.output, shards.shard_index(uri), tbl)
            rows.append(len(data.keys))
            counts.append(np.bincount(probs.argmax(1).cpu().numpy(), minlength=probs.shape[1]))
        return {"shard": batch["shard"], "rows": np.array(rows), "counts": np.stack(counts)}


def run_label(cfg: LabelConfig, checkpoint: str | None = None) -> dict:
    cfg = cfg.model_copy(update={"shards": storage.absolute(cfg.shards), "output": storage.absolute(cfg.output)})
    checkpoint = resolve_checkpoint(storage.absolute(checkpoint or cfg.checkpoint))
    state = load_checkpoint(checkpoint)
    if not state.get("finished"):
        raise ValueError(f"{checkpoint} is from epoch {state['epoch'] + 1} of a run that did not finish; some methods fit "
                         "their cluster head only at the end (k-means, NMM's normalisers). Label the run's last "
                         "checkpoint, or finish the run first (dicl train with the same train.name resumes it)")
    manifest = shards.read_manifest(cfg.shards)
    uris = shards.shard_uris(cfg.shards, manifest)
    storage.check_writable(cfg.output)
    run = {"checkpoint": checkpoint, "shards": cfg.shards, "content_hash": manifest["content_hash"]}
    done = {p.rsplit("/", 1)[-1] for p in assignments.start_run(cfg.output, run)}
    todo = [u for u in uris if assignments.part_name(shards.shard_index(u)) not in done]
    if len(todo) < len(uris):
        print(f"label: {len(uris) - len(todo)} of {len(uris)} shards already labelled at {cfg.output}; doing the rest")
    t0 = time.perf_counter()
    gpu = want_gpu(cfg.use_gpu)
    if todo:
        ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardLabeler, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(todo))),
            num_gpus=1 if gpu else 0, num_cpus=1,
            fn_constructor_kwargs={"checkpoint": checkpoint, "manifest": manifest,
                                   "cfg": cfg.model_dump(mode="json"), "gpu": gpu},
        )
        ds.materialize()
    seconds = time.perf_counter() - t0
    sizes = {s["name"]: s["samples"] for s in manifest["shards"]}
    # Counts come from the parts themselves, so a resumed run reports the whole corpus.
    table = assignments.read(cfg.output, columns=["key", "cluster"])
    if table["key"].duplicated().any():
        raise RuntimeError(f"{cfg.output}: some keys appear more than once; clear the folder and re-run")
    info = {
        "run_id": uuid.uuid4().hex,
        "checkpoint": checkpoint,
        "shards": cfg.shards,
        "rows": int(len(table)),
        "expected_rows": manifest["num_samples"],
        "counts": {int(k): int(v) for k, v in sorted(Counter(table["cluster"]).items())},
        "seconds": seconds,
        "images_per_second": sum(sizes[u.rsplit("/", 1)[-1]] for u in todo) / seconds if todo else None,
    }
    assignments.write_success(cfg.output, info)
    return info
