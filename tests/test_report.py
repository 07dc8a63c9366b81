"""The report page, built without Ray from real shards, a saved model and its assignments, and rendered in headless
Chromium (Debian's package; the rendering test says so and skips where it is not installed)."""
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from clustering import DeepClusterer, report
from clustering.data import shards
from clustering.config import PipelineConfig, PredictConfig, load_config
from clustering.predict import run_predict
from clustering.data.sources import digits_source
from jobs.pipeline import write_report

TRIALS = {"metric": "modularity", "trials": [
    {"values": {"k": 10}, "modularity": 0.81, "silhouette": 0.2, "evenness": 0.99, "clusters_used": 10, "seconds": 3.0},
    {"values": {"k": 6}, "modularity": 0.62, "silhouette": 0.1, "evenness": 0.97, "clusters_used": 6, "seconds": 2.0,
     "stopped_at_epoch": 3}]}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A work_dir with the digits' shards, a k-means model's checkpoint and its assignments; the report of it."""
    work = tmp_path_factory.mktemp("work")
    src = digits_source()
    written = [shards.write_items(src, g, f"{work}/shards/{shards.shard_name(i)}")
               for i, g in enumerate(shards.plan_shards(src.plan(), 900, 1 << 30))]
    shapes = sum((w["shapes"] for w in written), type(written[0]["shapes"])())
    shards.write_manifest(f"{work}/shards", {
        "shards": [w["shard"] for w in written], "num_samples": 1797, "labelled": 1797, "classes": None,
        "image": shards.choose_image(shards.shape_summary(shapes)), "content_hash": "h"})
    images = src.images
    checkpoint = DeepClusterer("kmeans", k=10, seed=0).fit(images).save(f"{work}/runs/km/checkpoint_000000")
    cfg = load_config(PipelineConfig, None, [f"work_dir={work}", f"label.output={work}/assignments"])
    run_predict(DeepClusterer.load(checkpoint), [f"{work}/shards"], PredictConfig(output=f"{work}/assignments"),
                progress=False)
    summary, uri = write_report(cfg, SimpleNamespace(checkpoint=checkpoint, name="km"), TRIALS)
    return work, summary, uri


class Sections(HTMLParser):
    """Counts the cluster sections of a page and the images in each one's grid of most confident images."""

    def __init__(self):
        super().__init__()
        self.clusters, self.current, self.in_most, self.tables = {}, None, False, set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "cluster" in a.get("class", ""):
            self.current = int(a["data-cluster"])
            self.clusters[self.current] = 0
        elif tag == "div" and "most" in a.get("class", ""):
            self.in_most = True
        elif tag == "div":
            self.in_most = False
        elif tag == "img" and self.in_most and self.current is not None:
            self.clusters[self.current] += 1
        elif tag == "table":
            self.tables.add(a.get("class", "plain"))


def test_the_report_shows_each_cluster_its_labels_and_the_trials_and_names_no_local_path(page):
    work, summary, uri = page
    text = open(uri).read()
    shown = re.sub(r"<script.*?</script>", "", text, flags=re.S)  # the page less BokehJS and the map's data
    assert str(work) not in text and "<pre>" not in shown  # no absolute local path, no raw JSON
    assert "Tune trials" in text and "stopped at epoch 3" in text and "Clusters against the labels" in text
    assert "Embedding" in text and "least confident" in text and "digits/000" in text  # keys under the thumbnails
    parsed = Sections()
    parsed.feed(text)
    assert sorted(parsed.clusters) == sorted(summary["cluster_sizes"]) and all(parsed.clusters.values())
    assert "confusion" in parsed.tables
    # clusters named by their dominant label, each picture with its true label, the sources on hover
    assert re.search(r"Cluster \d+: [\d,]+ images \(mostly \d \(\d+%\)\)", text) and "<br>label " in text
    assert 'title="sklearn:digits#' in text
    # the interactive map: BokehJS inline (no network), a point per drawn image with its key and thumbnail for the
    # tooltip, and the click that filters the cluster sections
    assert "embedding-map" in text and "@image" in text and "querySelectorAll(" in text and "section.cluster" in text
    assert not re.search(r'<script[^>]+src="https?:', text) and "Bokeh" in text
    assert len(re.findall(r"data:image/png;base64", text)) > 1000  # the map's tooltips, beside the grids' images


def test_the_report_renders_in_headless_chromium_with_one_grid_per_cluster(page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the page is not rendered here")
    work, summary, uri = page
    run = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(run + ["--dump-dom", f"file://{uri}"], capture_output=True, text=True, timeout=120).stdout
    parsed = Sections()
    parsed.feed(dom)
    assert sorted(parsed.clusters) == sorted(summary["cluster_sizes"]) and all(n >= 1 for n in parsed.clusters.values())
    assert 'data-map-drawn="yes"' in dom  # BokehJS ran and drew the embedding map
    shot = tmp_path / "page.png"
    subprocess.run(run + [f"--screenshot={shot}", "--window-size=1200,2000", f"file://{uri}"], capture_output=True,
                   timeout=120)
    assert shot.stat().st_size > 10_000  # a page with pictures, not a blank one


def test_the_model_s_view_of_a_read_only_decoded_image_is_stretched_without_a_warning():
    image = np.full((4, 4, 1), 100, np.uint8)
    image[0, 0] = 50
    image.setflags(write=False)  # as a decoded shard's array comes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = report.as_model_sees(image)
    assert seen.max() == 255 and seen[0, 0, 0] == 128  # stretched so that the brightest pixel is white
