import numpy as np
import pytest

from clustering import metrics
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


def three_groups() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Three well-separated groups of 8x8 "images", and four partitions of them."""
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (3, 8, 8, 1))
    truth = np.repeat(np.arange(3), 40)
    images = np.clip(centres[truth] + rng.normal(0, 12, (120, 8, 8, 1)), 0, 255).astype(np.uint8)
    return images, {"truth": truth, "merged": np.minimum(truth, 1), "shuffled": rng.permutation(truth),
                    "split": np.where((truth == 2) & (np.arange(120) % 2 == 0), 3, truth)}


def test_pixel_silhouette_prefers_the_true_partition():
    # The true split beats a merge, a split and a random labelling.
    images, partitions = three_groups()
    truth = partitions["truth"]
    good, merged, split, shuffled = (metrics.pixel_silhouette(images, partitions[name])
                                     for name in ("truth", "merged", "split", "shuffled"))
    assert good > max(merged, split) and good > 0.5 > abs(shuffled)
    assert metrics.pixel_silhouette(images, np.zeros(120, int)) == -1.0  # one cluster: the worst score
    # on a sample, the score comes from the same images every time (comparable across runs)
    assert metrics.pixel_silhouette(images, truth, sample=50) == metrics.pixel_silhouette(images, truth, sample=50)


def test_knn_modularity_prefers_the_true_partition():
    # The true split beats a merge and a split; a random labelling and one cluster score about 0.
    images, partitions = three_groups()
    good, merged, split, shuffled = (metrics.knn_modularity(images, partitions[name])
                                     for name in ("truth", "merged", "split", "shuffled"))
    # every link stays inside its group, so the score is 1 minus the chance term, 1 - 3 * (1/3)^2
    assert good == pytest.approx(2 / 3) and good > max(merged, split) and abs(shuffled) < 0.1
    assert metrics.knn_modularity(images, np.zeros(120, int)) == pytest.approx(0.0)
    assert metrics.knn_modularity(images[:1], np.zeros(1, int)) == 0.0  # one image: no links


def test_knn_modularity_follows_neighbours_where_the_silhouette_follows_distance():
    # Two long parallel strokes, close together: the silhouette prefers cutting both in halves (compact pieces),
    # the neighbour graph keeps each stroke whole, since an image's nearest images lie on its own stroke.
    t = np.linspace(0, 255, 60)
    points = np.concatenate([np.stack([t, np.zeros(60)], 1), np.stack([t, np.full(60, 30.0)], 1)])
    images = points.reshape(120, 1, 2, 1).astype(np.uint8)
    strokes, halves = np.repeat([0, 1], 60), np.tile(np.repeat([0, 1], 30), 2)
    assert metrics.pixel_silhouette(images, halves) > metrics.pixel_silhouette(images, strokes)
    assert metrics.knn_modularity(images, strokes) > metrics.knn_modularity(images, halves)


def test_fine_clusters_merge_into_the_groups_of_unequal_size_that_the_neighbours_link():
    # Three groups of 200, 40 and 40 images. The fine clusters split the frequent group into four and each rare one
    # into two (one fine cluster holds no image): merged into 3 they are the groups, where 3 clusters of even size
    # would have split the frequent group and merged the rare ones.
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], [200, 40, 40])
    images = np.clip(rng.integers(0, 256, (3, 8, 8, 1))[truth] + rng.normal(0, 12, (280, 8, 8, 1)), 0, 255)
    fine = np.where(truth == 0, np.arange(280) % 4, np.where(truth == 1, 4 + np.arange(280) % 2, 7 + np.arange(280) % 2))
    graph = metrics.knn_graph(images.reshape(280, -1), 10)
    merge = metrics.merge_by_modularity(graph, fine, 10, 3)
    assert merge.shape == (10,) and set(merge) == {0, 1, 2}  # every fine cluster, the empty 6 and 9 too, joins one
    assert scores(truth, merge[fine])["acc"] == 1.0
    # fewer fine clusters holding an image than k: none merge, and the empty ones fill the clusters left over
    few = metrics.merge_by_modularity(graph, np.minimum(truth, 1), 4, 3)
    assert few[0] != few[1] and set(few) == {0, 1, 2}


def test_views_that_leave_their_fine_cluster_tip_a_merge_towards_the_styles_of_one_class():
    # Class 0 comes in two styles of 100 images each (fine clusters 0 and 1) whose images send a third of their 10
    # links to the other style; classes 1 and 2 have 40 (fine clusters 2 and 3) and send one link to each other. On
    # those links alone, modularity's chance term makes the two small classes the cheaper merge into 3. A third of the
    # views of each class-0 image fall in its other style, which tips the merge to the styles.
    rng = np.random.default_rng(0)
    fine = np.repeat([0, 1, 2, 3], [100, 100, 40, 40])
    truth = np.array([0, 0, 1, 2])[fine]
    members = [np.flatnonzero(fine == c) for c in range(4)]
    other = {0: 1, 1: 0, 2: 3, 3: 2}

    def links(i: int) -> np.ndarray:
        c = fine[i]
        crossing = (4 if i % 3 == 0 else 3) if c < 2 else 1
        same = rng.choice(members[c][members[c] != i], 10 - crossing, replace=False)
        return np.concatenate([same, rng.choice(members[other[c]], crossing, replace=False)])
    graph = np.stack([links(i) for i in range(280)])
    alone = metrics.merge_by_modularity(graph, fine, 4, 3)
    assert alone[2] == alone[3] and alone[0] != alone[1]
    views = np.repeat(fine[:, None], 6, 1)
    views[:200, :2] = 1 - views[:200, :2]  # 2 of 6 views of each class-0 image fall in its other style
    assert scores(truth, metrics.merge_by_modularity(graph, fine, 4, 3, views=views)[fine])["acc"] == 1.0
    # views that stay in their image's fine cluster add nothing
    assert np.array_equal(metrics.merge_by_modularity(graph, fine, 4, 3, views=np.repeat(fine[:, None], 6, 1)), alone)


def test_modularity_splits_off_a_style_where_modularity_x_evenness_keeps_the_class():
    # A quarter of class 0 is drawn in a style of its own, which shares no neighbours with the rest of the class:
    # modularity rises when the style splits off, as it does for merged fine clusters at k above the classes' number.
    # The split leaves a small cluster, so the product with evenness still prefers the classes.
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (3, 8, 8, 1)).astype(float)
    truth = np.repeat(np.arange(3), 40)
    drawn = centres[truth]
    drawn[:10] = np.clip(centres[0] + rng.normal(0, 40, (8, 8, 1)), 0, 255)
    images = np.clip(drawn + rng.normal(0, 12, (120, 8, 8, 1)), 0, 255).astype(np.uint8)
    split = np.where(np.arange(120) < 10, 3, truth)
    scores = metrics.LabelFreeScores(images, sample=120)
    classes, styles = scores(truth, 3), scores(split, 4)
    assert styles["modularity"] > classes["modularity"]
    assert styles["modularity_x_evenness"] < classes["modularity_x_evenness"]
    assert styles["modularity_x_evenness"] == pytest.approx(styles["modularity"] * styles["evenness"])


def test_stability_is_one_when_views_keep_their_clusters_and_about_zero_when_they_reshuffle():
    images, partitions = three_groups()
    truth = partitions["truth"]
    scores = metrics.LabelFreeScores(images, sample=60)
    kept = scores(truth, 3, view_clusters=truth[scores.index])
    renamed = scores(truth, 3, view_clusters=(truth[scores.index] + 1) % 3)  # the same partition, other names
    reshuffled = scores(truth, 3, view_clusters=np.random.default_rng(0).permutation(truth[scores.index]))
    assert kept["stability"] == renamed["stability"] == 1.0 and abs(reshuffled["stability"]) < 0.1
    assert "stability" not in scores(truth, 3)  # without the views' clusters there is none


def test_views_of_images_are_the_same_for_every_run_and_leave_the_random_stream_alone():
    import torch

    from clustering import engine

    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(1)
    a = engine.views_of(x)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(a, engine.views_of(x)) and torch.equal(torch.rand(1), after)
    assert a.dtype == torch.uint8 and a.shape == x.shape and not torch.equal(a, x)
