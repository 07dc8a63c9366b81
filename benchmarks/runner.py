"""The benchmarks' one runner: each script is a short main that builds on `parser`, measures, and ends with
`finish` (tables printed, JSON written). Also what several measure with: data loaded into memory as uint8
(N, H, W, C) with labels, MNIST replicated into shards, a local Ray, peak memory."""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from clustering.data import shards
from clustering.data.sources import ArraySource, open_source


def load_arrays(spec: str, limit: int | None = None, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A source (folder, IDX, .npz, sklearn:digits) -> (uint8 (N, H, W, C), int labels (-1 unknown)).

    limit keeps the first N images; sample draws N at random (seed 0), for sources listed class by class."""
    src = open_source(spec)
    items = src.plan()[:limit]
    if sample is not None and sample < len(items):
        pick = np.sort(np.random.default_rng(0).choice(len(items), sample, replace=False))
        items = [items[i] for i in pick]
    if isinstance(src, ArraySource):
        idx = [it.ref for it in items]
        imgs = src.images[idx]
        imgs = imgs[..., None] if imgs.ndim == 3 else imgs
    else:
        first = src.load(items[0])
        mode, side = ("L" if first.mode == "L" else "RGB"), min(first.height, first.width)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            imgs = np.stack(list(pool.map(lambda it: shards.decode_image(src.load(it).data, mode, side), items, chunksize=512)))
    labels = np.array([-1 if it.label is None else it.label for it in items], dtype=np.int64)
    return imgs, labels


def imbalanced(images: np.ndarray, labels: np.ndarray, ratio: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classes subsampled to frequencies from 1x to `ratio`x (seeded): in a random order of the classes, class i keeps
    a share of its images rising evenly from 1/ratio (the rarest) to all of them (the most frequent)."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels[labels >= 0]))
    keep = []
    for i, c in enumerate(classes):
        rows = np.flatnonzero(labels == c)
        share = (1 + (ratio - 1) * i / max(1, len(classes) - 1)) / ratio
        keep.append(rng.choice(rows, max(1, round(share * len(rows))), replace=False))
    keep = np.sort(np.concatenate(keep))
    return images[keep], labels[keep]


def messy(images: np.ndarray, seed: int = 0, sizes: tuple[float, float] = (1.0, 4.0),
          quality: tuple[int, int] = (30, 95), tinted: float = 0.5) -> list[bytes]:
    """The same content however it was captured: each image (seeded) resized by a factor in `sizes`, tinted into a
    colour image with probability `tinted` (a random colour cast, gray stays gray otherwise), and saved as a JPEG
    of a quality in `quality`. Returns the encoded files, to go through the input policy as any collection does."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for a in images:
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        side = max(8, round(im.width * rng.uniform(*sizes)))
        im = im.resize((side, side), Image.BILINEAR)
        if rng.random() < tinted:
            tint = rng.uniform(0.5, 1.0, 3)
            im = Image.fromarray(np.clip(np.asarray(im.convert("RGB"), np.float32) * tint, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(*quality)))
        out.append(buf.getvalue())
    return out


def decode_collection(files: list[bytes], side: int | None = None) -> np.ndarray:
    """Encoded images -> uint8 (N, side, side, C) by the input policy, the mode and side chosen from the images
    as the shard job chooses them (`side`, train.image_size, overrides the side)."""
    import io
    from collections import Counter

    from PIL import Image

    shapes = Counter()
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            shapes[(im.height, im.width, im.mode)] += 1
    chosen = shards.choose_image(shards.shape_summary(shapes))
    mode = "L" if chosen["channels"] == 1 else "RGB"
    return np.stack([shards.decode_image(data, mode, side or chosen["side"]) for data in files])


def at_side(images: np.ndarray, cfg) -> np.ndarray:
    """uint8 (N, H, W, C) images at the side the run of `cfg` trains at (`TrainConfig.side_for`) by the input policy,
    as the shard job's readers give them (engine.fit trains on arrays as given)."""
    from clustering.data.given import to_images

    return to_images(images, "L" if images.shape[-1] == 1 else "RGB", cfg.side_for(images.shape[1]))


def imbalance_arguments(p: argparse.ArgumentParser) -> None:
    """--imbalance and --draw: the classes at unequal frequencies (`imbalanced`)."""
    p.add_argument("--imbalance", type=float, default=0, metavar="R",
                   help="subsample the classes to frequencies from 1x to Rx (seeded), e.g. 5: clusters of unequal size")
    p.add_argument("--draw", type=int, default=0, metavar="D",
                   help="with --imbalance: which seeded draw of the classes' frequencies (0, the results' own, makes "
                   "the 4s the rarest class and the 9s frequent, the digits' most alike pair)")


def variant_arguments(p: argparse.ArgumentParser) -> None:
    """--imbalance, --draw and --messy: the variants of a labelled data set that issue 35's targets are measured on."""
    imbalance_arguments(p)
    p.add_argument("--messy", action="store_true", help="the same images as a messy collection: sizes x1..x4, half "
                   "tinted to colour, JPEG quality 30..95 (seeded), through the input policy")


def variant(images: np.ndarray, labels: np.ndarray, args: argparse.Namespace,
            side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels as --imbalance and --messy ask (`variant_arguments`), saying what they became; the
    messy images decoded at `side` (train.image_size) where it is set."""
    if args.imbalance:
        images, labels = imbalanced(images, labels, args.imbalance, args.draw)
        print(f"imbalanced 1x..{args.imbalance:g}x (draw {args.draw}): class sizes {np.bincount(labels).tolist()}",
              flush=True)
    if args.messy:
        images = decode_collection(messy(images), side)
        print(f"messy (sizes x1..x4, half tinted, JPEG q30..95), through the input policy: {images.shape[1:]}",
              flush=True)
    return images, labels


def parser(doc: str, out: str, data: str | None | bool = "sklearn:digits", config: bool = False
           ) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --out (its JSON); --data (a source, with this default; None: it is
    required; False: no --data); with `config`, --config and --set (a YAML with a train: section and key=value
    overrides, as the CLI reads them)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="the JSON to write")
    if data is not False:
        p.add_argument("--data", default=data, required=data is None,
                       help="image folder, MNIST IDX folder, .npz or sklearn:digits")
    if config:
        p.add_argument("--config", default=None, help="YAML with a train: section (configs/*.yaml)")
        p.add_argument("--set", nargs="*", default=[], help="overrides, e.g. train.joint_epochs=20")
    return p


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


@contextlib.contextmanager
def local_ray(cpus: int):
    """A private local Ray for the benchmarks that run the jobs, with Ray Train's environment as the CLI sets it."""
    import ray

    from jobs.runtime import ray_train_environment

    ray_train_environment()
    ray.init(num_cpus=cpus, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def finish(out: str, payload: dict, *tables: tuple[list[dict], list[str] | None]) -> None:
    """Print each table (its rows, and columns: None = the first row's keys), then write the payload as JSON."""
    for rows, columns in tables:
        print()
        print_table(rows, columns or list(rows[0]))
    write_json(out, payload)


def data_label(spec: str) -> str:
    """A data argument as results name it: a folder of this checkout relative to it, one elsewhere by its own name
    alone (results are committed, and a machine's paths mean nothing to their readers); URIs and sklearn: as given."""
    path = Path(spec)
    if ":" in spec.split("/")[0] or not path.is_absolute():  # s3://..., sklearn:digits, or relative
        return spec
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


PATH_KEYS = ("data", "representation_from", "weights")  # values that name files or folders, as data_label names them


def labelled(obj):
    """The payload with every value of PATH_KEYS, at any depth (the configs in it too), as `data_label` names it."""
    if isinstance(obj, dict):
        return {key: data_label(v) if key in PATH_KEYS and isinstance(v, str) and v else labelled(v)
                for key, v in obj.items()}
    return [labelled(v) for v in obj] if isinstance(obj, list) else obj


def write_json(path: str, payload: dict) -> None:
    payload = labelled(payload)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def replicated_shards(spec: str, root: str, factors: list[int], per_shard: int = 10_000) -> dict[int, str]:
    """Shard `spec` once (root/x1), then write root/xF with F copies of every 1x shard, keys prefixed by the copy
    (`c3/...`), so that every key stays unique. Tar members are re-written, not re-encoded. {F: shard folder}."""
    from collections import Counter

    base = f"{root}/x1"
    if not Path(base, shards.MANIFEST).exists():
        src = open_source(spec)
        groups = shards.plan_shards(src.plan(), per_shard, 1 << 40)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            stats = list(pool.map(lambda ig: shards.write_items(src, ig[1], f"{base}/{shards.shard_name(ig[0])}"),
                                  enumerate(groups)))
        shapes = Counter()
        for s in stats:
            shapes.update(s["shapes"])
        summary = shards.shape_summary(shapes)
        shards.write_manifest(base, {"shards": [s["shard"] for s in stats], "num_samples": len(src.plan()),
                                     "image": shards.choose_image(summary), "shapes": summary,
                                     "labelled": sum(s["labelled"] for s in stats), "content_hash": spec})
    one = shards.read_manifest(base)
    out = {}
    for f in factors:
        folder = f"{root}/x{f}"
        out[f] = folder
        if f == 1 or Path(folder, shards.MANIFEST).exists():
            continue
        jobs = [(f"{base}/{s['name']}", copy, f"{folder}/{shards.shard_name(copy * len(one['shards']) + i)}")
                for copy in range(f) for i, s in enumerate(one["shards"])]
        with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("forkserver")) as pool:
            written = list(pool.map(copy_shard, *zip(*jobs)))
        shards.write_manifest(folder, {**one, "shards": written, "num_samples": one["num_samples"] * f,
                                       "content_hash": f"{spec} x{f}"})
    return out


def copy_shard(uri: str, copy: int, out: str) -> dict:
    """One shard re-written with its keys prefixed by the copy (`c3/...`): its members as they are."""
    samples = [{k: v for k, v in m.items() if k != "__url__"} | {"__key__": f"c{copy}/{m['__key__']}"}
               for m in shards.read_shard(uri)]
    return shards.write_shard(samples, out)


class PeakRSS:
    """Samples, every `every` seconds in a thread, the resident memory of this process and of Ray's worker
    processes (a Ray Train worker counts with its loader processes). `peaks` after stop():
    driver (bytes), worker (the largest worker's peak), workers (peak of their sum)."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.stop_event = every, threading.Event()
        self.peaks = {"driver": 0, "worker": 0, "workers": 0}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        self.peaks["driver"] = max(self.peaks["driver"], me.memory_info().rss)
        total = 0
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if not cmd.startswith("ray::") or "IDLE" in cmd:
                    continue
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            except psutil.Error:
                continue
            self.peaks["worker"] = max(self.peaks["worker"], rss)
            total += rss
        self.peaks["workers"] = max(self.peaks["workers"], total)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.every)

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()


def mib(n: int) -> int:
    return round(n / 2**20)
