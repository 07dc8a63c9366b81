"""Scores against ground-truth labels where they exist: ACC (Hungarian matching), NMI, ARI; and label-free ones,
used to choose among runs: the modularity of the clusters on the images' nearest-neighbour graph, their silhouette
in pixel space, and the evenness of the cluster sizes."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors


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


def fixed_sample(images: np.ndarray, clusters: np.ndarray, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same `sample` images for every run (flat pixels scaled to [0, 1]) and their clusters: the common ground
    on which the label-free scores compare runs (a net's own features are not: each net shapes them around its k)."""
    idx = np.random.default_rng(seed).permutation(len(images))[:sample]
    return images[idx].reshape(len(idx), -1).astype(np.float32) / 255.0, np.asarray(clusters)[idx]


def pixel_silhouette(images: np.ndarray, clusters: np.ndarray, sample: int = 10_000, seed: int = 0) -> float:
    """Silhouette of a partition measured on the images' pixels, on a fixed sample. -1 when fewer than two
    clusters are used. On the 8x8 digits it peaks at k = 10 among 6..16; on MNIST it is flat (docs/RESULTS.md)."""
    pixels, picked = fixed_sample(images, clusters, sample, seed)
    if not 2 <= len(np.unique(picked)) < len(picked):  # the silhouette is defined for 2..n-1 clusters
        return -1.0
    return float(silhouette_score(pixels, picked))


def knn_modularity(images: np.ndarray, clusters: np.ndarray, sample: int = 10_000, neighbours: int = 10,
                   seed: int = 0) -> float:
    """Modularity of a partition on the directed graph that links each image to its `neighbours` nearest images
    in pixel space (Leicht & Newman 2008), on a fixed sample: the share of links that stay inside a cluster, minus
    the share expected by chance given how many links leave and reach each cluster. Merging two classes raises the
    chance term, splitting one cuts links, so it peaks at the partition the neighbours agree with. 0 for a single
    cluster and about 0 for a random labelling; at most 1. Over MNIST runs with k = 6..16 its rank correlation with
    ACC was 0.87, the pixel silhouette's 0.57 (docs/RESULTS.md, "Choosing without labels")."""
    pixels, picked = fixed_sample(images, clusters, sample, seed)
    if len(picked) < 2:  # no links to score
        return 0.0
    nbrs = NearestNeighbors(n_neighbors=min(neighbours, len(picked) - 1)).fit(pixels).kneighbors(
        return_distance=False)  # (S, neighbours); without X, an image is not its own neighbour
    c = np.unique(picked, return_inverse=True)[1]
    inside = (c[nbrs] == c[:, None]).mean()
    leaving = np.bincount(c) / len(c)  # every image sends the same number of links
    reaching = np.bincount(c[nbrs].ravel(), minlength=len(leaving)) / nbrs.size
    return float(inside - leaving @ reaching)


def label_free(images: np.ndarray, clusters: np.ndarray, k: int, sample: int = 10_000) -> dict:
    """The scores a run is chosen by (Tune, benchmarks/selection.py): no labels involved."""
    sizes = np.bincount(clusters, minlength=k)
    return {"modularity": knn_modularity(images, clusters, sample),
            "silhouette": pixel_silhouette(images, clusters, sample),
            "evenness": evenness(sizes), "clusters_used": int((sizes > 0).sum())}
