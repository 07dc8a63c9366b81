"""Scores against ground-truth labels where they exist: ACC (Hungarian matching), NMI, ARI; and label-free ones,
used to choose among runs: evenness of the cluster sizes, and the silhouette of the clusters in pixel space."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_score,
)


def cluster_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to labels (invariant to renaming clusters)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    n = max(labels.max(), clusters.max()) + 1
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {
        "acc": cluster_acc(labels, clusters),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
    }


def evenness(cluster_sizes) -> float:
    """Entropy of the cluster-size distribution over log k: 1 when all k clusters are equal, 0 when one holds all.
    Label-free: a run that merges two classes early has one cluster of twice the usual size."""
    p = np.asarray(cluster_sizes, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(cluster_sizes)))


def pixel_silhouette(images: np.ndarray, clusters: np.ndarray, sample: int = 10_000, seed: int = 0) -> float:
    """Silhouette of a partition measured on the images' pixels (scaled to [0, 1]), on a fixed random sample.
    Label-free, and comparable across runs because the space is the same for all of them (a net's own features
    are not: each net shapes its space around its own k). -1 when fewer than two clusters are used.
    On the 8x8 digits it peaks at k = 10 among 6..16 (docs/RESULTS.md, "Choosing without labels")."""
    pixels = images.reshape(len(images), -1)
    idx = np.random.default_rng(seed).permutation(len(pixels))[:sample]
    picked = np.asarray(clusters)[idx]
    if not 2 <= len(np.unique(picked)) < len(idx):  # the silhouette is defined for 2..n-1 clusters
        return -1.0
    return float(silhouette_score(pixels[idx].astype(np.float32) / 255.0, picked))


def label_free(images: np.ndarray, clusters: np.ndarray, k: int, sample: int = 10_000) -> dict:
    """The scores a run is chosen by (Tune, benchmarks/selection.py): no labels involved."""
    sizes = np.bincount(clusters, minlength=k)
    return {"silhouette": pixel_silhouette(images, clusters, sample), "evenness": evenness(sizes),
            "clusters_used": int((sizes > 0).sum())}
