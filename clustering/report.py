"""The look at a result: cluster sizes, scores where labels exist, a picture grid per cluster, curves; HTML."""
from __future__ import annotations

import base64
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from . import assignments, metrics, shards, storage  # noqa: E402
from .config import TuneConfig  # noqa: E402

SOURCE_IMAGES = 20_000  # images of the first shards read back for the picture grids and the label-free score
SCORE_SAMPLE = TuneConfig().score_sample  # of those, the images the label-free score is measured on, as in tune


def labels_of(shards_uri: str, manifest: dict) -> pd.Series:
    """Ground-truth labels by key, read from the shards' .cls members (scoring only)."""
    keys, labels, sha = [], [], shards.digests(manifest)
    for uri in shards.shard_uris(shards_uri, manifest):
        for s in shards.read_shard(uri, sha[shards.name_of(uri)]):
            if "cls" in s:
                keys.append(s["__key__"])
                labels.append(int(s["cls"]))
    return pd.Series(labels, index=keys, dtype=np.int64)


def first_images(shards_uri: str, limit: int = SOURCE_IMAGES) -> tuple[np.ndarray, list[str]]:
    """Decoded images and keys of the first shards, at least `limit` images (or all there are). Read once and
    passed to `summarize` and `montages`, which both look at them."""
    manifest = shards.read_manifest(shards_uri)
    mode, side = shards.image_spec(manifest)
    images, keys, sha = [], [], shards.digests(manifest)
    for uri in shards.shard_uris(shards_uri, manifest):
        d = shards.load_shard(uri, mode, side, sha256=sha[shards.name_of(uri)])
        images.append(d.images)
        keys += d.keys
        if len(keys) >= limit:
            break
    return np.concatenate(images), keys


def summarize(output: str, shards_uri: str, seen: tuple[np.ndarray, list[str]] | None = None) -> dict:
    """Counts per cluster; the label-free modularity of the clusters (metrics.knn_modularity, as the tune job
    scores trials) on images of the first shards (`seen`, from first_images); and, where the shards carry labels,
    ACC/NMI/ARI over the corpus."""
    manifest = shards.read_manifest(shards_uri)
    table = assignments.read(output, columns=["key", "cluster", "confidence"])
    images, keys = seen or first_images(shards_uri)
    clusters = table.set_index("key")["cluster"].reindex(keys)
    known = clusters.notna().to_numpy()  # a skipped image has no row
    summary = {
        "rows": int(len(table)),
        "unique_keys": int(table["key"].nunique()),
        "expected_rows": manifest["num_samples"],
        "cluster_sizes": {int(k): int(v) for k, v in table["cluster"].value_counts().sort_index().items()},
        "mean_confidence": float(table["confidence"].mean()),
        "modularity": metrics.knn_modularity(images[known], clusters[known].to_numpy(np.int64), SCORE_SAMPLE),
    }
    if manifest.get("labelled"):
        truth = labels_of(shards_uri, manifest)
        joined = table.set_index("key").join(truth.rename("label"), how="inner")
        summary["scored_rows"] = int(len(joined))
        summary.update(metrics.scores(joined["label"].to_numpy(), joined["cluster"].to_numpy()))
    return summary


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def montages(output: str, shards_uri: str, seen: tuple[np.ndarray, list[str]] | None = None,
             per_cluster: int = 16) -> dict[int, str]:
    """The most confident images of each cluster, among the first shards' (`seen`), as one PNG grid per cluster
    (base64)."""
    table = assignments.read(output, columns=["key", "cluster", "confidence"]).set_index("key")
    images, keys = seen or first_images(shards_uri)
    sub = table.loc[table.index.intersection(keys)]
    pos = {k: i for i, k in enumerate(keys)}
    grids = {}
    for cluster, rows in sub.groupby("cluster"):
        best = rows.sort_values("confidence", ascending=False).index[:per_cluster]
        fig, axes = plt.subplots(1, per_cluster, figsize=(per_cluster * 0.6, 0.7))
        for ax, key in zip(np.atleast_1d(axes), list(best) + [None] * per_cluster):
            ax.axis("off")
            if key is not None:
                img = images[pos[key]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
        grids[int(cluster)] = figure_png(fig)
    return grids


def policy_chart(shards_uri: str, mode: str, side: int, count: int = 6) -> str:
    """Images of the first shard as stored (top) and as the model sees them (bottom): the input policy
    (shards.POLICY) at the model's side, on as many different shapes as the shard has, up to `count`."""
    manifest = shards.read_manifest(shards_uri)
    by_shape: dict = {}
    first = manifest["shards"][0]
    for s in shards.read_shard(storage.join(shards_uri, first["name"]), first["sha256"]):
        meta = json.loads(s["json"]) if "json" in s else {}
        by_shape.setdefault((meta.get("width"), meta.get("height")), s)
    picks = list(by_shape.values())[:count]
    fig, axes = plt.subplots(2, len(picks), figsize=(len(picks) * 1.3, 2.8), squeeze=False)
    for i, sample in enumerate(picks):
        data = shards.image_of(sample)
        with Image.open(io.BytesIO(data)) as im:
            stored = np.asarray(im.convert(mode))
        seen = shards.decode_image(data, mode, side)
        for ax, img in zip(axes[:, i], (stored, seen)):
            ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img, cmap="gray")
            ax.set_title(f"{img.shape[1]}x{img.shape[0]}", fontsize=7)
            ax.axis("off")
    return figure_png(fig)


def sizes_chart(sizes: dict[int, int]) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.bar([str(k) for k in sizes], list(sizes.values()), color="#4477aa")
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    return figure_png(fig)


def curve_chart(history: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    for stage in dict.fromkeys(h["stage"] for h in history):
        pts = [(h["epoch"], h["loss"]) for h in history if h["stage"] == stage]
        ax.plot(*zip(*pts), label=stage)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    return figure_png(fig)


def write_html(report_dir: str, summary: dict, grids: dict[int, str], history: list[dict],
               policy: str | None = None) -> str:
    """The report page; `policy`: policy_chart's picture, shown with the policy's words."""
    img = lambda b64: f'<img src="data:image/png;base64,{b64}">'  # noqa: E731
    scores = "".join(f"<tr><th>{m.upper()}</th><td>{summary[m]:.4f}</td></tr>" for m in ("acc", "nmi", "ari") if m in summary)
    rows = "".join(
        f"<tr><td>{c}</td><td>{summary['cluster_sizes'].get(c, 0):,}</td><td>{img(g)}</td></tr>" for c, g in sorted(grids.items())
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Clustering report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>Clustering report</h1>
<p>{summary['rows']:,} images in {len(summary['cluster_sizes'])} clusters; mean confidence {summary['mean_confidence']:.3f};
modularity on the images' nearest-neighbour graph {summary['modularity']:.3f} (0: no better than chance, 1: every
image's 10 nearest images in its own cluster; no labels used).</p>
<table>{scores}</table>
<h2>Cluster sizes</h2>{img(sizes_chart(summary['cluster_sizes']))}
{'<h2>Training loss</h2>' + img(curve_chart(history)) if history else ''}
{f'<h2>Input policy</h2><p>Every image is read the same way: {shards.POLICY}. Stored (top), as the model sees it (bottom):</p>' + img(policy) if policy else ''}
<h2>Most confident images per cluster</h2><table><tr><th>cluster</th><th>size</th><th></th></tr>{rows}</table>
<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre></body></html>"""
    uri = storage.join(report_dir, "index.html")
    storage.write_bytes(uri, page.encode())
    storage.write_bytes(storage.join(report_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    return uri
