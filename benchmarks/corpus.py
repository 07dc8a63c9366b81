"""Corpus benchmark: what one process (the driver) costs as a corpus grows, at every stage, on CPU with tiny images
(this measures per-image overhead); and JPEG decoding at the size the model needs.

    python benchmarks/corpus.py --images 100000 1000000 --work /tmp/dicl-corpus
    python benchmarks/corpus.py --decode-only --out docs/results/corpus-decode-cpu.json

For each N, in a fresh process each (so that its peak resident memory is its own), on a local Ray:
- shard: N loose PNG files (the digits, 8x8, 1,000 a folder) -> shards; driver peak RSS, wall time, files/s;
- index: the same N images as a WebDataset corpus written by webdataset's TarWriter (10,000 a tar) -> a manifest
  of the tars in place; driver peak RSS, wall time, bytes written under the output;
- label: each of the two, with one small model; driver peak RSS, wall time, and the completion step alone.
Then the ratios of the largest N to the smallest (targets: driver RSS <= x1.2, wall time <= x11 for x10 images),
and full against reduced (draft) JPEG decoding of photo-sized JPEGs to a 64 px input, per core (target >= x3), with
the bytes shard.store=resized keeps of each.
Prints tables and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from runner import finish, local_ray, parser

PER_FOLDER = 1000
PER_TAR = 10_000


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.round(load_digits().images * (255 / 16)).astype(np.uint8)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_data(work: Path, n: int) -> tuple[Path, Path]:
    """N loose PNGs and the same N as tars (made once, reused)."""
    loose, tars = work / f"loose-{n}", work / f"tars-{n}"
    imgs = digits()
    encoded = [png(im) for im in imgs]
    if not (loose / "DONE").exists():
        made = set()
        for i in range(n):
            folder = loose / f"c{i % 10}" / f"p{i // (10 * PER_FOLDER):05d}"  # 10 class folders of 1,000-file parts
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
            (folder / f"img{i:08d}.png").write_bytes(encoded[i % len(encoded)])
        (loose / "DONE").touch()
    if not (tars / "DONE").exists():
        import webdataset as wds

        tars.mkdir(parents=True, exist_ok=True)
        for t in range(0, n, PER_TAR):
            with wds.TarWriter(str(tars / f"{t // PER_TAR:05d}.tar")) as sink:
                for i in range(t, min(t + PER_TAR, n)):
                    sink.write({"__key__": f"{i:09d}", "png": encoded[i % len(encoded)],
                                "json": {"url": f"https://example.com/{i}.png"}})
        (tars / "DONE").touch()
    return loose, tars


def bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stage(kind: str, source: str, out: str, checkpoint: str, cpus: int) -> dict:
    """One stage in this process; returns its figures (driver peak RSS: this process' own)."""
    from clustering.config import LabelConfig, ShardConfig, TrainConfig

    t0 = time.perf_counter()
    with local_ray(cpus):
        if kind in ("shard", "index"):
            from jobs.shard import run_shard

            manifest = run_shard(ShardConfig(source=source, output=out), progress=False)
            row = {"images": manifest["num_samples"], "shards": len(manifest["shards"])}
        elif kind == "train":  # one small model (ae_kmeans, 1 epoch on a sample) that every label stage uses
            from jobs.train import run_train

            trained = run_train(TrainConfig.of(shards=source, storage_path=out, name="bench", method="ae_kmeans",
                                               pretrain_epochs=1, joint_epochs=0, augment=False, cpus_per_worker=1,
                                               sample=20_000))
            row = {"checkpoint": trained.checkpoint}
        else:
            from jobs.label import run_label

            info = run_label(LabelConfig(shards=source, output=out, write_probs=False), checkpoint=checkpoint)
            row = {"images": info["rows"], "completion_s": round(info["completion_seconds"], 2)}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["driver_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def in_fresh_process(kind: str, source: str, out: str, checkpoint: str, cpus: int) -> dict:
    """A stage in a process of its own (this one never starts Ray, so no stage inherits anything of another), into
    an empty output: a rerun measures the whole stage again, never a resumed one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--stage", kind, source, out, checkpoint, str(cpus)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jpeg_decode(count: int = 40) -> dict:
    """Photo-sized JPEGs (1024x768, q85: a smooth colour field with grain of three strengths, from a flat photo to a
    busy one) to a 64 px input: a full decode then the policy, against PIL's draft mode (decoding at 1/8 scale)
    then the policy; and the read of what shard.store=resized keeps of each (the 64 px input, a JPEG at q95). One
    core; images per second, and the JPEGs' mean size (entropy decoding, which draft cannot skip, grows with it)."""
    from clustering.data.shards import apply_policy, decode_image

    def full(data):
        with Image.open(io.BytesIO(data)) as im:
            return apply_policy(im, "RGB", 64)

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:1024]
    rows = []
    for grain in (0, 6, 12):
        files = []
        for i in range(4):
            base = np.stack([np.sin(xx / (50 + 9 * i)), np.cos(yy / (70 + 5 * i)), np.sin((xx + yy) / 90)], -1)
            arr = np.clip(127 + 100 * base + rng.normal(0, grain, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            files.append(buf.getvalue())
        rates = []
        for fn in (full, lambda d: decode_image(d, "RGB", 64)):
            t0 = time.perf_counter()
            for j in range(count):
                fn(files[j % len(files)])
            rates.append(count / (time.perf_counter() - t0))
        stored = []  # what shard.store=resized keeps of each: the 64 px input as a JPEG at quality 95
        for f in files:
            buf = io.BytesIO()
            Image.fromarray(decode_image(f, "RGB", 64)).save(buf, format="JPEG", quality=95)
            stored.append(buf.getvalue())
        t0 = time.perf_counter()
        for j in range(count * 10):  # what train and label then decode: the stored input
            decode_image(stored[j % len(stored)], "RGB", 64)
        rates.append(count * 10 / (time.perf_counter() - t0))
        rows.append({"grain": grain, "jpeg_kib": round(np.mean([len(f) for f in files]) / 1024), "full_img_s": round(rates[0]),
                     "draft_img_s": round(rates[1]), "speedup": round(rates[1] / rates[0], 2),
                     "resized_bytes": round(np.mean([len(b) for b in stored])),
                     "resized_img_s": round(rates[2]), "resized_speedup": round(rates[2] / rates[0], 1)})
    return {"rows": rows, "jpeg": "1024x768 RGB q85", "input": "64x64 RGB"}


def decode_line(decode: dict) -> str:
    return ("JPEG to 64 px, reduced (draft) over full decode: " + ", ".join(
        f"x{r['speedup']} at {r['jpeg_kib']} KiB" for r in decode["rows"]) + " (target >= 3); the resized store's "
        "read over full decode: " + ", ".join(f"x{r['resized_speedup']}" for r in decode["rows"]))


def main() -> None:
    if sys.argv[1:2] == ["--stage"]:
        kind, source, out, checkpoint, cpus = sys.argv[2:7]
        print(json.dumps(stage(kind, source, out, checkpoint, int(cpus))))
        return
    p = parser(__doc__, "docs/results/corpus.json", data=False)
    p.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", default="/tmp/dicl-corpus", help="where the data and outputs go (data kept, reused)")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--decode-only", action="store_true", help="only the JPEG decode comparison (seconds)")
    args = p.parse_args()
    if args.decode_only:
        decode = jpeg_decode()
        finish(args.out, {"jpeg_decode": decode}, (decode["rows"], None))
        print(decode_line(decode))
        return
    work = Path(args.work)
    rows = []
    for n in sorted(args.images):
        loose, tars = make_data(work, n)
        for kind, source, out in [("shard", loose, work / f"out-{n}/shards"), ("index", tars, work / f"out-{n}/index")]:
            row = {"stage": kind, "n": n, **in_fresh_process(kind, str(source), str(out), "", args.cpus)}
            if kind == "shard":
                row["files_s"] = round(n / row["wall_s"])
            else:
                row["bytes_written"] = bytes_under(out)
            rows.append(row)
            print(row, flush=True)
    smallest = min(args.images)
    checkpoint = in_fresh_process("train", str(work / f"out-{smallest}/shards"), str(work / "runs"), "", args.cpus)["checkpoint"]
    for n in sorted(args.images):
        for kind, shards_uri in [("label shards", work / f"out-{n}/shards"), ("label index", work / f"out-{n}/index")]:
            out = work / f"out-{n}/{kind.replace(' ', '-')}"
            row = {"stage": kind, "n": n, **in_fresh_process("label", str(shards_uri), str(out), checkpoint, args.cpus)}
            rows.append(row)
            print(row, flush=True)
    small, large = min(args.images), max(args.images)
    ratios = []
    for kind in ("shard", "index", "label shards", "label index"):
        a = next(r for r in rows if r["stage"] == kind and r["n"] == small)
        b = next(r for r in rows if r["stage"] == kind and r["n"] == large)
        ratios.append({"stage": kind, "images": f"{small:,} -> {large:,}",
                       "driver_rss_ratio": round(b["driver_peak_mib"] / a["driver_peak_mib"], 3),
                       "wall_ratio": round(b["wall_s"] / a["wall_s"], 2)})
    decode = jpeg_decode()
    finish(args.out, {"cpus": args.cpus, "rows": rows, "ratios": ratios, "jpeg_decode": decode},
           (rows, ["stage", "n", "images", "wall_s", "driver_peak_mib", "files_s", "bytes_written", "completion_s"]),
           (ratios, None), (decode["rows"], None))
    print(decode_line(decode))


if __name__ == "__main__":
    main()
