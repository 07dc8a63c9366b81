"""Scores against ground-truth labels where they exist: ACC (Hungarian matching), NMI, ARI."""
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
