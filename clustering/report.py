"""The look at a result, as one HTML page: sizes and scores, per cluster its most and least confident images with
their keys, an embedding plot, clusters against labels where they exist, the tune trials, the loss curve."""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from . import metrics  # noqa: E402
from .data import assignments, shards, storage  # noqa: E402
from .model import levels  # noqa: E402
from .config import TuneConfig  # noqa: E402

SOURCE_IMAGES = 20_000  # images of the sampled shards the report reads back: pictures, scores and the embedding
SCORE_SAMPLE = TuneConfig().score_sample  # of those, the images the label-free score is measured on, as in tune


@dataclass
class Sample:
    """What the report looks at, bounded whatever the corpus' size: a seeded random sample of whole shards (at least
    `SOURCE_IMAGES` images, or all), their images decoded, their rows of the assignments, and the run's counts
    over the whole corpus from `_SUCCESS.json` (added up from the parts' footers)."""
    data: shards.Decoded  # the sampled shards' images, keys and labels (-1 where unknown)
    table: pd.DataFrame  # their rows, by key: cluster, confidence
    success: dict  # the label run's _SUCCESS.json
    shards: int  # shards sampled
    of_shards: int  # shards in the corpus
    expected_rows: int  # the corpus' images, as its manifest counts them


def sample_shards(manifest: dict, limit: int, seed: int = 0) -> list[dict]:
    """Manifest entries of a seeded random sample of shards holding at least `limit` images, in manifest order."""
    order = np.random.default_rng(seed).permutation(len(manifest["shards"]))
    taken, count = [], 0
    for i in order:
        if count >= limit:
            break
        taken.append(int(i))
        count += manifest["shards"][i]["samples"]
    return [manifest["shards"][i] for i in sorted(taken)]


def sample(output: str, shards_uri: str, limit: int = SOURCE_IMAGES, seed: int = 0) -> Sample:
    manifest = shards.read_manifest(shards_uri)
    try:
        success = json.loads(storage.read_bytes(storage.join(output, assignments.SUCCESS)))
    except storage.Missing:
        raise storage.StorageError(f"{output} holds no finished label run ({assignments.SUCCESS} is missing): "
                                   "run dicl label first") from None
    entries = sample_shards(manifest, limit, seed)
    data = shards.load_shards([shards.shard_uri(shards_uri, e) for e in entries], manifest)
    parts = [assignments.part_uri(output, e) for e in entries]
    table = assignments.read_parts(parts, ["key", "cluster", "confidence"]).set_index("key")
    return Sample(data, table, success, len(entries), len(manifest["shards"]), manifest["num_samples"])


def summarize(output: str, shards_uri: str, seen: Sample | None = None, deskew: bool = False) -> dict:
    """Counts per cluster over the corpus (from `_SUCCESS.json`); on the sampled shards (`seen`): the mean
    confidence, the label-free modularity of the clusters (metrics.knn_modularity, on the graph the tune job scores
    trials on: each image deskewed first where the run's `train.deskew` is set) and, where the shards carry labels,
    ACC/NMI/ARI; with the sample's size beside them."""
    seen = seen or sample(output, shards_uri)
    clusters = seen.table["cluster"].reindex(seen.data.keys)
    known = clusters.notna().to_numpy()  # a skipped image has no row
    success = seen.success
    summary = {
        "rows": int(success["rows"]),
        "expected_rows": int(seen.expected_rows),
        "skipped": int(success.get("skipped", {}).get("count", 0)),
        "cluster_sizes": {int(k): int(v) for k, v in sorted(success["counts"].items(), key=lambda kv: int(kv[0]))},
        "sample_rows": int(known.sum()),
        "sample_shards": f"{seen.shards} of {seen.of_shards}",
        "mean_confidence": float(seen.table["confidence"].mean()),
        "modularity": metrics.knn_modularity(seen.data.images[known], clusters[known].to_numpy(np.int64), SCORE_SAMPLE,
                                             deskew=deskew),
    }
    scored = known & (seen.data.labels >= 0)
    if scored.any():
        summary["scored_rows"] = int(scored.sum())
        summary.update(metrics.scores(seen.data.labels[scored], clusters[scored].to_numpy(np.int64)))
    return summary


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def thumbnail(img: np.ndarray) -> str:
    """One image as a base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Shown:
    """One image of a cluster's grid."""
    key: str
    confidence: float
    thumbnail: str  # base64 PNG
    label: str = ""  # its true label, where the shards carry labels (for reading the grid only)
    source: str = ""  # where the image came from (`source` column): a link where it is a web address


@dataclass
class ClusterView:
    size: int
    most: list[Shown]  # the most confident images
    least: list[Shown]  # the least confident: the cluster's borderline images
    composition: dict[str, int] = field(default_factory=dict)  # label -> images, where labels exist

    def named(self) -> str:
        """The cluster's dominant label and its share of the cluster's labelled images, where labels exist."""
        if not self.composition:
            return ""
        label, n = max(self.composition.items(), key=lambda kv: kv[1])
        return f"mostly {label} ({n / sum(self.composition.values()):.0%})"


def cluster_views(output: str, shards_uri: str, seen: Sample | None = None,
                  most: int = 12, least: int = 6) -> dict[int, ClusterView]:
    """Per cluster: its size (over the corpus) and its most and least confident images among the sampled shards'
    (`seen`), with their keys."""
    seen = seen or sample(output, shards_uri)
    keys = seen.data.keys
    sub = seen.table.loc[seen.table.index.intersection(keys)]
    pos = {k: i for i, k in enumerate(keys)}
    by_cluster = dict(list(sub.groupby("cluster")))
    names = label_names(shards_uri)
    sources = seen.data.sources or [""] * len(keys)

    def shown(k: str, confidence: float) -> Shown:
        i = pos[k]
        return Shown(k, confidence, thumbnail(seen.data.images[i]), names(int(seen.data.labels[i])), sources[i])

    views = {}
    for cluster, size in sorted((int(k), int(v)) for k, v in seen.success["counts"].items()):
        rows = by_cluster.get(cluster, sub.iloc[:0]).sort_values("confidence", ascending=False)
        pick = lambda idx: [shown(k, float(rows.at[k, "confidence"])) for k in idx]  # noqa: E731
        top = list(rows.index[:most])
        rest = [k for k in rows.index[::-1][:least] if k not in top]
        views[cluster] = ClusterView(size, pick(top), pick(rest[::-1]))
    return views


def label_names(shards_uri: str):
    """label index -> its name (the class folder's, where the manifest has them), "" where unknown."""
    classes = shards.read_manifest(shards_uri).get("classes") or []
    return lambda i: "" if i < 0 else (classes[i] if i < len(classes) else str(i))


def add_composition(views: dict[int, ClusterView], output: str, shards_uri: str,
                    seen: Sample | None = None) -> pd.DataFrame | None:
    """Where the shards carry labels: each cluster's images by label among the sampled shards (also kept in views),
    as a confusion matrix (clusters x labels)."""
    manifest = shards.read_manifest(shards_uri)
    if not manifest.get("labelled"):
        return None
    seen = seen or sample(output, shards_uri)
    truth = pd.Series(seen.data.labels, index=seen.data.keys)
    joined = seen.table.join(truth[truth >= 0].rename("label"), how="inner")
    matrix = pd.crosstab(joined["cluster"], joined["label"])
    classes = manifest.get("classes")
    if classes:
        matrix.columns = [classes[c] if 0 <= c < len(classes) else str(c) for c in matrix.columns]
    for cluster, row in matrix.iterrows():
        if int(cluster) in views:
            views[int(cluster)].composition = {str(label): int(n) for label, n in row.items() if n}
    return matrix


def projection(codes: np.ndarray) -> np.ndarray:
    """(N, 2): the embeddings on their first two principal components."""
    from sklearn.decomposition import PCA

    return PCA(2, random_state=0).fit_transform(codes) if codes.shape[1] > 2 else codes


def embedding_map(codes: np.ndarray, clusters: np.ndarray, confidence: np.ndarray, keys: list[str],
                  images: np.ndarray) -> str:
    """An interactive map (Bokeh, its script inline: one offline file) of the images' embeddings on their first two
    principal components, coloured by cluster: hovering a point shows its image, key, cluster and confidence;
    clicking one shows only its cluster's section below (clicking the background shows all again)."""
    from bokeh.document import Document
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, TapTool
    from bokeh.palettes import Category10_10, Category20_20
    from bokeh.plotting import figure

    xy = projection(codes)
    palette = Category10_10 if clusters.max() < 10 else Category20_20
    source = ColumnDataSource({
        "x": xy[:, 0], "y": xy[:, 1], "cluster": clusters.astype(int), "confidence": confidence.round(3),
        "key": list(keys), "colour": [palette[int(c) % len(palette)] for c in clusters],
        "image": ["data:image/png;base64," + thumbnail(small(im)) for im in images]})
    fig = figure(width=640, height=480, tools="pan,wheel_zoom,box_zoom,reset,tap", x_axis_label="PC 1",
                 y_axis_label="PC 2", name="embedding-map")
    fig.scatter("x", "y", source=source, color="colour", size=6, alpha=0.7, nonselection_alpha=0.15)
    fig.add_tools(HoverTool(tooltips="""<div><img src="@image" width="48" height="48"
        style="image-rendering:pixelated"><br>@key<br>cluster @cluster, confidence @confidence</div>"""))
    show_cluster = CustomJS(args={"source": source}, code="""
        const picked = source.selected.indices.map(i => String(source.data.cluster[i]));
        for (const s of document.querySelectorAll('section.cluster'))
            s.style.display = picked.length === 0 || picked.includes(s.dataset.cluster) ? '' : 'none';""")
    source.selected.js_on_change("indices", show_cluster)
    fig.select_one(TapTool).behavior = "select"
    doc = Document()  # once BokehJS has drawn the map, the page's body says so (what a headless browser can read)
    doc.add_root(fig)
    doc.js_on_event("document_ready", CustomJS(code="document.body.dataset.mapDrawn = 'yes';"))
    script, div = components(fig)
    return div + script


def small(img: np.ndarray, side: int = 32) -> np.ndarray:
    """An image at most `side` pixels wide, for the map's tooltips (2,000 of them stay a few MB)."""
    if img.shape[0] <= side:
        return img
    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).resize((side, side), Image.BILINEAR)
    out = np.asarray(im)
    return out[..., None] if out.ndim == 2 else out


def bokeh_js() -> str:
    """BokehJS, inline: the page needs no network to draw its map."""
    from bokeh.resources import INLINE

    return INLINE.render_js()


def as_model_sees(image: np.ndarray) -> np.ndarray:
    """A decoded uint8 image (H, W, C) with its levels stretched, as the model's input is (`model/levels.py`)."""
    x = levels.pixels_to_input(torch.tensor(image).permute(2, 0, 1)[None])[0]  # a copy: decoded arrays are read-only
    return x.permute(1, 2, 0).mul_(255).round_().to(torch.uint8).numpy()


def policy_chart(shards_uri: str, mode: str, side: int, count: int = 6) -> str:
    """Images of the first shard as stored (top) and as the model sees them (bottom): the input policy
    (shards.POLICY, then levels.POLICY) at the model's side, on as many different shapes as the shard has, up to
    `count`."""
    manifest = shards.read_manifest(shards_uri)
    by_shape: dict = {}
    first = manifest["shards"][0]
    for s in shards.read_shard(shards.shard_uri(shards_uri, first), shards.check_of(first)):
        try:
            meta = json.loads(s["json"]) if "json" in s else {}
        except ValueError:  # a corpus' own json, read as it is
            meta = {}
        by_shape.setdefault((meta.get("width"), meta.get("height")), s)
    picks = list(by_shape.values())[:count]
    fig, axes = plt.subplots(2, len(picks), figsize=(len(picks) * 1.3, 2.8), squeeze=False)
    for i, sample in enumerate(picks):
        data = shards.image_of(sample)
        with Image.open(io.BytesIO(data)) as im:
            stored = np.asarray(im.convert(mode))
        seen = as_model_sees(shards.decode_image(data, mode, side))
        for ax, img in zip(axes[:, i], (stored, seen)):
            ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img, cmap="gray")
            ax.set_title(f"{img.shape[1]}x{img.shape[0]}", fontsize=7)
            ax.axis("off")
    return figure_png(fig)


def sizes_chart(sizes: dict[int, int]) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    bars = ax.bar([str(k) for k in sizes], list(sizes.values()), color="#4477aa")
    ax.bar_label(bars, labels=[f"{n:,}" for n in sizes.values()], fontsize=7)  # the counts, on the bars
    ax.margins(y=0.15)
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


@dataclass
class Report:
    """What the page shows; `render` makes it HTML."""
    summary: dict
    clusters: dict[int, ClusterView]
    run: dict  # method, k, run name, image_size: what was trained
    history: list[dict] = field(default_factory=list)
    policy: str | None = None  # policy_chart's PNG
    embedding: str | None = None  # embedding_map's HTML
    confusion: pd.DataFrame | None = None
    trials: dict | None = None  # the tune job's trials.json


def shown(uri: str, work_dir: str) -> str:
    """A location as the page shows it: relative to work_dir, a URI as it is, never an absolute local path."""
    root = storage.absolute(work_dir).rstrip("/") + "/"
    uri = storage.absolute(uri)
    if uri.startswith(root):
        return uri[len(root):]
    return uri if storage.is_remote(uri) else PurePosixPath(uri).name


def figures(items: list[Shown]) -> str:
    """A grid of thumbnails, each with its key and confidence (and its true label where known), its source on hover,
    and a link to the source where that is a web address."""
    out = []
    for it in items:
        label = f"<br>label {html.escape(it.label)}" if it.label else ""
        image = (f'<img src="data:image/png;base64,{it.thumbnail}" alt="{html.escape(it.key)}" '
                 f'title="{html.escape(it.source or it.key)} ({it.confidence:.2f})">')
        if it.source.startswith(("http://", "https://")):
            image = f'<a href="{html.escape(it.source)}">{image}</a>'
        out.append(f"<figure>{image}<figcaption>{html.escape(it.key)}<br>{it.confidence:.2f}{label}</figcaption></figure>")
    return "".join(out)


def confusion_html(matrix: pd.DataFrame) -> str:
    top = max(1, int(matrix.to_numpy().max()))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in matrix.columns)
    body = "".join(
        f"<tr><th>{cluster}</th>" + "".join(
            f'<td style="background:rgba(68,119,170,{n / top:.2f})">{n}</td>' for n in row) + "</tr>"
        for cluster, row in matrix.iterrows())
    return f'<table class="confusion"><tr><th>cluster \\ label</th>{head}</tr>{body}</table>'


def trials_html(trials: dict) -> str:
    metric = trials["metric"]
    keys = sorted({k for t in trials["trials"] for k in t["values"]})
    scores = [m for m in ("modularity", "modularity_x_evenness", "silhouette", "evenness", "stability", "clusters_used",
                          "acc_vs_labels", "neighbour_purity_vs_labels", "seconds")  # the terminal's table, and more
              if any(m in t for t in trials["trials"])]
    head = "".join(f"<th>{k}</th>" for k in keys + scores) + "<th>status</th>"
    rows = []
    for i, t in enumerate(trials["trials"]):
        status = ("error: " + t["error"]) if "error" in t else (f"stopped at epoch {t['stopped_at_epoch']}"
                                                                if "stopped_at_epoch" in t else "finished")
        cells = [html.escape(str(t["values"].get(k, ""))) for k in keys]
        cells += [f"{t[m]:.3f}" if isinstance(t.get(m), float) else str(t.get(m, "")) for m in scores]
        mark = ' class="best"' if i == 0 and "error" not in t else ""
        rows.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{html.escape(status)}</td></tr>")
    return (f"<p>Chosen by {metric} (no labels); best first. ACC is shown where labels exist, never used to "
            f"choose.</p><table>{'<tr>' + head + '</tr>'}{''.join(rows)}</table>")


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px} td,th{padding:3px 8px;text-align:left}
img{image-rendering:pixelated} .grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure{margin:0;width:64px;text-align:center} figure img{width:56px;height:56px}
figcaption{font-size:9px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;color:#444}
.cluster{border-top:1px solid #ccc;padding:8px 0} .least{margin-left:24px;border-left:3px solid #cc6677;padding-left:8px}
.confusion td{text-align:right;min-width:2.5em} tr.best td{font-weight:bold}"""


def render(r: Report) -> str:
    s, img = r.summary, (lambda b64, alt: f'<img src="data:image/png;base64,{b64}" alt="{alt}">')
    scores = " ".join(f"{m.upper()} {s[m]:.4f}" for m in ("acc", "nmi", "ari") if m in s)
    sections = []
    for c, v in sorted(r.clusters.items()):
        comp = ", ".join(f"{html.escape(label)} {n}" for label, n in sorted(v.composition.items(), key=lambda x: -x[1])[:4])
        sections.append(
            f'<section class="cluster" id="cluster-{c}" data-cluster="{c}"><h3>Cluster {c}: {v.size:,} images'
            + (f" ({html.escape(v.named())})" if v.named() else "") + "</h3>"
            + (f"<p>by label: {comp}</p>" if comp else "")
            + f'<div class="grid most">{figures(v.most)}</div>'
            + (f'<p>least confident:</p><div class="grid least">{figures(v.least)}</div>' if v.least else "")
            + "</section>")
    run = r.run
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Clustering report: {html.escape(str(run.get('run')))}</title>
<style>{STYLE}</style>{bokeh_js() if r.embedding else ''}</head><body><h1>Clustering report</h1>
<p><b>{s['rows']:,}</b> images in <b>{len(r.clusters)}</b> clusters by <b>{html.escape(str(run.get('method')))}</b>
(k={run.get('k')}, run {html.escape(str(run.get('run')))}, images at {run.get('image_size')}x{run.get('image_size')}).
On a seeded sample of {s['sample_rows']:,} images ({s['sample_shards']} shards), which the pictures below show too:
mean confidence {s['mean_confidence']:.3f}; modularity on the images' nearest-neighbour graph {s['modularity']:.3f}
(0: no better than chance, 1: every image's 10 nearest images in its own cluster; no labels used).
{'Against the labels (' + format(s['scored_rows'], ',') + ' labelled images): ' + scores + '.' if scores else ''}</p>
<p>Assignments: <code>{html.escape(run.get('assignments', ''))}</code>; checkpoint:
<code>{html.escape(run.get('checkpoint', ''))}</code>.</p>
<h2>Cluster sizes</h2>{img(sizes_chart(s['cluster_sizes']), 'cluster sizes')}
{'<h2>Embedding</h2><p>Embeddings of up to 2,000 images drawn at random (seeded) from the sampled shards, on their first two principal components. Hover a point for its image; click one to show only its cluster below (click the background to show all).</p>' + r.embedding if r.embedding else ''}
{'<h2>Clusters against the labels</h2>' + confusion_html(r.confusion) if r.confusion is not None else ''}
{'<h2>Tune trials</h2>' + trials_html(r.trials) if r.trials else ''}
{'<h2>Training loss</h2>' + img(curve_chart(r.history), 'loss') if r.history else ''}
{f'<h2>Input policy</h2><p>Every image is read the same way: {shards.POLICY}; then {levels.POLICY}. Stored (top), as the model sees it (bottom):</p>' + img(r.policy, 'policy') if r.policy else ''}
<h2>Clusters</h2><p>Per cluster: its most confident images, then its least confident (the borderline), each with its
key and confidence.</p>
{''.join(sections)}
</body></html>"""
    return page


def write(report_dir: str, r: Report) -> str:
    """index.html and summary.json (the figures, for machines) under report_dir; returns the page's URI."""
    uri = storage.join(report_dir, "index.html")
    storage.write_bytes(uri, render(r).encode())
    storage.write_bytes(storage.join(report_dir, "summary.json"), json.dumps(r.summary, indent=1).encode())
    return uri
