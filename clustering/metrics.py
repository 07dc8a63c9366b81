"""Scores against ground-truth labels where they exist: ACC (Hungarian matching), NMI, ARI; and label-free ones,
used to choose among runs: the modularity of the clusters on the images' nearest-neighbour graph, their silhouette
in pixel space, and the evenness of the cluster sizes."""
from __future__ import annotations

import functools

import numpy as np

# scikit-learn and SciPy are imported where they are used: every training worker imports this module (for
# `evenness`), and the two cost a second of CPU in each new worker process.


def cluster_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to labels (invariant to renaming clusters)."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    n = max(labels.max(), clusters.max()) + 1
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

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


def stability(clusters: np.ndarray, view_clusters: np.ndarray) -> float:
    """ARI between the clusters of some images and those of one random view of each (the model's own
    augmentation, `engine.views_of`): 1 when no image changes cluster, about 0 when the views reshuffle them. It
    reads the model, not pixel neighbours, so it can speak on photographs; but a model trained on such views (nmm,
    iic, vc with consistency) has learnt to be stable under them, and few broad clusters are stabler than many."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(clusters, view_clusters))


def sample_index(n: int, sample: int, seed: int = 0) -> np.ndarray:
    """The same `sample` of n images for every run: the common ground on which the label-free scores compare runs
    (a net's own features are not: each net shapes them around its k)."""
    return np.random.default_rng(seed).permutation(n)[:sample]


def knn_graph(pixels: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """(S, neighbours) indices: each image's nearest images in pixel space, itself excluded."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=min(neighbours, len(pixels) - 1)).fit(pixels).kneighbors(return_distance=False)


def graph_modularity(nbrs: np.ndarray, clusters: np.ndarray) -> float:
    """Modularity of a partition on the directed graph `nbrs` (Leicht & Newman 2008): the share of links that stay
    inside a cluster, minus the share expected by chance given how many links leave and reach each cluster."""
    c = np.unique(clusters, return_inverse=True)[1]
    inside = (c[nbrs] == c[:, None]).mean()
    leaving = np.bincount(c) / len(c)  # every image sends the same number of links
    reaching = np.bincount(c[nbrs].ravel(), minlength=len(leaving)) / nbrs.size
    return float(inside - leaving @ reaching)


def merge_by_modularity(nbrs: np.ndarray, clusters: np.ndarray, n: int, k: int,
                        views: np.ndarray | None = None, view_links: float = 1.0) -> np.ndarray:
    """(n,) the cluster in 0..k-1 that each of n fine clusters joins: greedily, each step merges the two groups whose
    union raises the modularity of the partition on the directed graph `nbrs` most (Clauset, Newman & Moore 2004,
    from the fine clusters rather than single images). A class split in two keeps most links between its halves
    and joins again first; two classes share few. Fine clusters that hold no sampled image take no part: they fill
    the clusters left empty when fewer than k fine clusters hold one, else they are spread over the k.
    views: (S, V) the fine clusters of V random views of each sampled image (the method's augmentation). A view that
    leaves its image's fine cluster links the two with weight view_links / V, beside the image's pixel links (1
    each): where views are trained to agree, a view keeps its image's class more often than a pixel link between
    fine clusters does, and it spans styles that share few pixel neighbours (upright and slanted ones). Views that
    stay add nothing: self-links would only swell the chance term of large groups, which keeps their halves apart.
    A merge changes only the merged group's gains, so each step costs O(n) but for rows whose best partner it took."""
    links = np.zeros((n, n))
    np.add.at(links, (np.repeat(clusters, nbrs.shape[1]), clusters[nbrs].ravel()), 1.0)
    if views is not None and views.size:
        leaves = views != clusters[:, None]
        origin = np.broadcast_to(clusters[:, None], views.shape)[leaves]
        np.add.at(links, (origin, views[leaves]), view_links / views.shape[1])
    links /= max(links.sum(), 1.0)  # e_ij: the share of links from group i to group j
    leaving, reaching = links.sum(1), links.sum(0)
    used = np.isin(np.arange(n), clusters)  # fine clusters holding a sampled image
    group, alive = np.arange(n), used.copy()
    gain = np.full((n, n), -np.inf)  # the modularity a merge of groups i and j adds; -inf: no such merge
    gain[np.ix_(alive, alive)] = (links + links.T - np.outer(leaving, reaching) - np.outer(reaching, leaving))[
        np.ix_(alive, alive)]
    np.fill_diagonal(gain, -np.inf)
    partner = gain.argmax(1)  # each group's best merge
    while alive.sum() > k:
        i = int(np.argmax(gain[np.arange(n), partner]))
        j = int(partner[i])
        links[i] += links[j]
        links[:, i] += links[:, j]
        leaving[i] += leaving[j]
        reaching[i] += reaching[j]
        alive[j] = False
        group[group == j] = i
        row = links[i] + links[:, i] - leaving[i] * reaching - reaching[i] * leaving
        row[~alive] = -np.inf
        row[i] = -np.inf
        gain[i], gain[:, i], gain[j], gain[:, j] = row, row, -np.inf, -np.inf
        stale = (partner == i) | (partner == j) | (row > gain[np.arange(n), partner])
        stale[i] = True
        partner[stale] = gain[stale].argmax(1)
    out = np.empty(n, dtype=np.int64)
    out[used] = np.unique(group[used], return_inverse=True)[1]
    out[~used] = (len(np.unique(out[used])) + np.arange((~used).sum())) % k
    return out


class LabelFreeScores:
    """The label-free scores that choose among runs, for partitions of one image set: a fixed sample of it
    (`sample_index`) and that sample's neighbour graph are built once, so a tune trial scores itself along its run
    at the cost of a prediction.

    - modularity: of the clusters on the graph linking each image to its `neighbours` nearest images in pixel space,
      or in a learnt representation where the model has one (there neighbours share a class far more often).
      Merging two classes raises the chance term, splitting one cuts links, so it peaks at the partition the
      neighbours agree with. 0 for a single cluster and about 0 for a random labelling; at most 1. Over MNIST runs
      with k = 6..16 its rank correlation with ACC was 0.87, the pixel silhouette's 0.57 (docs/RESULTS.md).
    - silhouette: of the clusters on the pixels; -1 when fewer than two clusters are used. On the 8x8 digits it
      peaks at k = 10 among 6..16; on MNIST it is flat.
    - evenness of the cluster sizes (over all images).
    - modularity_x_evenness: their product, as `train.restarts` picks a start. Where the clusters are merged from
      fine ones (train.over_cluster), the merge has already raised modularity at every k: a class split along a
      style costs it little, and modularity alone then leans to k above the classes' number; the product does not.
    - stability: of the clusters of the sample under one random view of each image (`stability`), where the
      caller gives the views' clusters.
    """

    def __init__(self, images: np.ndarray, sample: int = 10_000, neighbours: int = 10, seed: int = 0,
                 space: str = "representation", deskew: bool = False):
        """images: uint8 (N, H, W, C), scored in pixel space (each image deskewed first where `deskew`:
        `train.deskew`); or float features (N, D) of a learnt representation or of a pretrained backbone (`space`
        names which), L2-normalised here so that their neighbours are the nearest by cosine, as SimCLR compares
        them."""
        self.neighbours = neighbours
        self.index = sample_index(len(images), sample, seed)
        picked = images[self.index]
        if deskew and images.dtype == np.uint8 and images.ndim == 4:
            import torch

            from .model.deskew import deskew as deskewed
            picked = deskewed(torch.from_numpy(picked).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        points = picked.reshape(len(self.index), -1).astype(np.float32)
        if images.dtype == np.uint8:
            self.space, self.points = "pixels", points / 255.0  # (S, H*W*C)
        else:
            self.space, self.points = space, points / np.maximum(
                np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
        self._graph: np.ndarray | None = None

    def modularity(self, clusters: np.ndarray) -> float:
        if len(self.index) < 2:  # no links to score
            return 0.0
        return graph_modularity(self.graph(), np.asarray(clusters)[self.index])

    def graph(self) -> np.ndarray:
        """(S, neighbours) each sampled image's nearest sampled images (built once)."""
        if self._graph is None:
            self._graph = knn_graph(self.points, self.neighbours)
        return self._graph

    def purity(self, labels: np.ndarray) -> float:
        """For information, where labels exist: the fraction of a sampled image's neighbours that share its class
        (-1: unknown, left out). NaN without labels."""
        picked = np.asarray(labels)[self.index]
        known = picked >= 0
        if len(picked) < 2 or not known.any():
            return float("nan")
        return float((picked[self.graph()[known]] == picked[known, None]).mean())

    def silhouette(self, clusters: np.ndarray) -> float:
        picked = np.asarray(clusters)[self.index]
        if not 2 <= len(np.unique(picked)) < len(picked):  # the silhouette is defined for 2..n-1 clusters
            return -1.0
        from sklearn.metrics import silhouette_score

        return float(silhouette_score(self.points, picked))

    def __call__(self, clusters: np.ndarray, k: int, names: tuple[str, ...] | None = None,
                 view_clusters: np.ndarray | None = None) -> dict:
        """The scores named (default: all there are) of a partition into k clusters, and how many clusters it
        uses. view_clusters: the clusters of a view of each sampled image (`self.index`), for `stability`."""
        sizes = np.bincount(clusters, minlength=k)
        modularity = functools.cache(lambda: self.modularity(clusters))  # once, where both scores read it
        score = {"modularity": lambda _: modularity(), "silhouette": self.silhouette,
                 "evenness": lambda _: evenness(sizes),
                 "modularity_x_evenness": lambda _: modularity() * evenness(sizes)}
        if view_clusters is not None:
            score["stability"] = lambda c: stability(np.asarray(c)[self.index], view_clusters)
        return {**{name: score[name](clusters) for name in names or score}, "clusters_used": int((sizes > 0).sum())}


def pixel_silhouette(images: np.ndarray, clusters: np.ndarray, sample: int = 10_000, seed: int = 0) -> float:
    """`LabelFreeScores.silhouette` of one partition."""
    return LabelFreeScores(images, sample, seed=seed).silhouette(clusters)


def knn_modularity(images: np.ndarray, clusters: np.ndarray, sample: int = 10_000, neighbours: int = 10,
                   seed: int = 0, deskew: bool = False) -> float:
    """`LabelFreeScores.modularity` of one partition."""
    return LabelFreeScores(images, sample, neighbours, seed, deskew=deskew).modularity(clusters)
