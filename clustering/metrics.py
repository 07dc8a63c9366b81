"""Scores against ground-truth labels where they exist: ACC (Hungarian matching), NMI, ARI; and label-free ones,
used to choose among runs: evenness of the cluster sizes."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


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
