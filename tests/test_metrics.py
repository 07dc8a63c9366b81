import numpy as np
import pytest

from clustering.metrics import cluster_acc, evenness, scores


def test_acc_is_invariant_to_renaming_clusters():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    noisy = np.where(rng.random(200) < 0.8, labels, rng.integers(0, 5, 200))
    perm = rng.permutation(5)
    assert cluster_acc(labels, noisy) == cluster_acc(labels, perm[noisy])
    assert cluster_acc(labels, perm[labels]) == 1.0


def test_scores_range():
    s = scores(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    assert s == {"acc": 1.0, "nmi": 1.0, "ari": 1.0}


def test_evenness_is_one_for_equal_clusters_and_zero_for_one():
    assert evenness([5, 5, 5, 5]) == pytest.approx(1.0)
    assert evenness([20, 0, 0, 0]) == pytest.approx(0.0)
    # a merge: one cluster of twice the usual size, another class split in two
    merged = evenness([20, 5, 5, 10, 10, 10, 10, 10, 10, 10])
    assert merged == pytest.approx(-(0.2 * np.log(0.2) + 2 * 0.05 * np.log(0.05) + 7 * 0.1 * np.log(0.1)) / np.log(10))
    assert merged < evenness([10] * 10)
