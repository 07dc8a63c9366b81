import torch

from clustering.model.heads import KMeansHead, MixtureHead, kmeans


def blobs(n=300, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])[:k]
    y = torch.arange(n) % k
    return centers[y] + 0.5 * torch.randn(n, 2, generator=g), y


def test_kmeans_finds_separated_blobs():
    x, y = blobs()
    head = KMeansHead(3, 2).fit(x)
    pred = head.predict(x)
    # every true blob maps to exactly one cluster
    assert all(len(pred[y == c].unique()) == 1 for c in range(3))
    assert len(pred.unique()) == 3


def test_kmeans_reseeds_empty_clusters():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 10])
    centers, _ = kmeans(x, 4, n_init=1, seed=1)
    assert torch.isfinite(centers).all() and len(centers) == 4


def test_k_larger_than_data_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="k=20 clusters but only 5 samples"):
        kmeans(torch.randn(5, 2), 20)


def test_mixture_head_reads_a_checkpoint_from_before_sub_heads():
    old = {"log_pi_": torch.tensor([0.2, 0.8]).log(), "log_norm_": torch.tensor([1.0, 2.0])}  # π was (K,)
    head = MixtureHead(2)
    head.load_state_dict(old)
    torch.testing.assert_close(head.log_pi_[0], old["log_pi_"])
    assert int(head.choice_) == 0
