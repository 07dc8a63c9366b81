import numpy as np

from clustering.metrics import cluster_acc, scores


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
