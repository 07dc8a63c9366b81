"""The representation path (issue 35): SimCLR's views, neighbours mined across workers, and NMM clustering in the
learnt features with its mined neighbours and self-labelling, for each seed objective (NMM, DCEC, VC); all on CPU
with small data."""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kornia.augmentation import RandomGaussianBlur

from clustering import checkpoints, engine
from clustering.model.augment import photo_views, rgb_view, simclr_view
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.data.sources import digits_source
from clustering.model import neighbours
from clustering.model.methods import build_method, embed_all, to_float
from clustering.model.methods.nmm import NMMSettings
from clustering.model.methods.scan import Scan
from infra.local_s3 import free_port


def features(n: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def mine_on_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo workers on 127.0.0.1: it holds half the rows and mines their neighbours over both halves."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = features()[rank * 150:(rank + 1) * 150]  # rank 0 the first half, rank 1 the second: global ids alike
        found = neighbours.mine(rows, Comm(rank, 2, dist.all_reduce), 7, chunk=64)
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_neighbours_mined_across_two_workers_equal_those_of_one_process(tmp_path):
    alone = neighbours.mine(features(), Comm(), 7, chunk=100)
    assert alone.shape == (300, 7) and not (alone == torch.arange(300)[:, None]).any()  # never itself
    sim = torch.nn.functional.normalize(features(), dim=1) @ torch.nn.functional.normalize(features(), dim=1).T
    sim.fill_diagonal_(-2)
    assert torch.equal(alone, sim.topk(7, dim=1).indices)  # the nearest by cosine, nearest first
    out = str(tmp_path / "found")
    mp.start_processes(mine_on_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
    both = torch.cat([torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)])
    assert torch.equal(both, alone)


def test_purity_counts_neighbours_of_the_same_class():
    labels = np.array([0, 0, 1, 1, -1])
    nbrs = np.array([[1, 2], [0, 1], [3, 0], [2, 4], [0, 1]])
    assert neighbours.purity(nbrs, labels) == pytest.approx((1 + 0.5 + 0.5 + 0.5) / 4)


def blurs(strength: str, height: int, width: int) -> int:
    return sum(isinstance(step, RandomGaussianBlur) for step in photo_views(strength, height, width))


def test_simclr_views_at_full_strength_keep_gray_gray_and_blur_only_where_the_size_allows():
    torch.manual_seed(0)
    gray = torch.rand(8, 1, 40, 40).expand(8, 3, 40, 40).contiguous()
    view = simclr_view(gray)  # jitter, hue and grayscale leave a gray image gray; crops and flips move it
    assert view.shape == gray.shape and 0 <= view.min() and view.max() <= 1
    assert torch.allclose(view[:, 0], view[:, 1], atol=1e-4) and torch.allclose(view[:, 1], view[:, 2], atol=1e-4)
    assert not torch.allclose(view, gray)
    assert blurs("representation", 32, 32) == blurs("representation", 16, 64) == 0  # CIFAR's size: none, as SimCLR
    assert blurs("representation", 64, 48) == 1 and blurs("clustering", 64, 64) == 0
    big = torch.rand(4, 3, 64, 64)
    assert simclr_view(big).shape == big.shape and rgb_view(big).shape == big.shape


# each seed objective's stages around SCAN's: the representation stage first, self-labelling last
# (vc's mixture needs a few more epochs to use more than 3 of its clusters on 600 digits)
SCAN_STAGES = {"nmm": ["em"] * 3, "dcec": ["pretrain"] * 2 + ["joint"] * 3, "vc": ["elbo"] * 6}


@pytest.mark.parametrize("method", list(SCAN_STAGES))
def test_each_seed_objective_learns_a_representation_then_clusters_with_its_neighbours_then_self_labels(method):
    src = digits_source()
    images = src.images[:600, ..., None]
    joint = SCAN_STAGES[method].count(SCAN_STAGES[method][-1])
    cfg = TrainConfig.of(method=method, k=10, joint_epochs=joint, batch_size=128, contrast_epochs=2, neighbours=5,
                         selflabel_epochs=2, **({"pretrain_epochs": 2} if method == "dcec" else {}))
    seen = []
    model = engine.fit(images, cfg, log=lambda s: None, on_epoch=lambda e, m, f: seen.append(m))
    # the last epoch reports as "final", after the end-of-run step
    assert [m["stage"] for m in seen] == ["contrast"] * 2 + SCAN_STAGES[method] + ["selflabel"] + ["final"]
    assert all(np.isfinite(m["loss"]) for m in seen)
    x = engine.device_images(images, "cpu")
    clusters = engine.predict_all(model, x)[0].argmax(1)
    assert len(clusters.unique()) > 3
    learnt = engine.representation_of(cfg, model, x)  # where the label-free scores find neighbours
    assert learnt is not None and len(learnt) == len(x)


@pytest.mark.parametrize("method", list(SCAN_STAGES))
def test_without_a_representation_stage_neighbours_are_mined_in_the_pixels_as_the_model_sees_them(method):
    images = torch.from_numpy(digits_source().images[:200, None])
    recipe = build_method(TrainConfig.of(method=method, k=10, neighbours=5), 1, 8)
    model = recipe.build()
    clustering = next(s for s in recipe.stages() if s.name in ("em", "elbo", "pretrain"))
    recipe.start_epoch(clustering, clustering.start, model, images, Comm())
    if method == "dcec":  # its neighbours are read in the joint stage, after pretraining
        assert recipe.scan.knn is None
        model.head.fit(embed_all(model, images))
        joint = recipe.stages()[-1]
        recipe.start_epoch(joint, joint.start, model, images, Comm())
    assert torch.equal(recipe.scan.knn, neighbours.mine(to_float(images).flatten(1), Comm(), 5))


# where each method's encoder (the representation) and what reads it live in its state dict
ENCODER_AND_HEAD = {"nmm": ("net.net.0.", "net.net.6."), "dcec": ("ae.encoder.", "head."), "vc": ("trunk.", "to_y.")}


@pytest.mark.parametrize("method", list(ENCODER_AND_HEAD))
def test_a_frozen_representation_learns_in_its_stage_only_and_what_reads_it_learns_on(method):
    cfg = TrainConfig.of(method=method, k=10, contrast_epochs=1, freeze_representation=True)
    recipe = build_method(cfg, 1, 8)
    model = recipe.build()
    encoder, reader = ENCODER_AND_HEAD[method]
    images = torch.from_numpy(digits_source().images[:64, None])
    for stage in recipe.stages():  # before each epoch of each stage, as the engine calls it (a resume too)
        if stage.name != "joint":  # (dcec's first joint epoch needs its head fitted by start_stage)
            recipe.start_epoch(stage, stage.start, model, images, Comm())
        learning = {key for key, p in model.named_parameters() if p.requires_grad}
        held = {key for key, _ in model.named_parameters() if key.startswith(encoder)}
        assert held and (held <= learning if stage.name == "contrast" else not held & learning), stage.name
        assert any(key.startswith(reader) for key in learning)
    with pytest.raises(ValueError, match="freeze_representation needs the representation"):
        TrainConfig.of("test", method=method, freeze_representation=True)


def test_a_frozen_representation_keeps_its_weights_through_a_run():
    images = digits_source().images[:300, ..., None]
    cfg = TrainConfig.of(method="nmm", k=10, joint_epochs=2, batch_size=128, contrast_epochs=1, neighbours=5,
                         freeze_representation=True)
    states = {}
    engine.fit(images, cfg, log=lambda s: None, on_epoch=lambda e, m, f: states.update({e: copy.deepcopy(f())}))
    after_contrast, last = states[0]["model"], states[2]["model"]
    conv = [key for key in last if key.startswith("net.net.0.") and key.endswith("weight")]
    assert conv and all(torch.equal(after_contrast[key], last[key]) for key in conv)
    assert not torch.equal(after_contrast["net.net.6.weight"], last["net.net.6.weight"])  # the mixture's layer learns


@pytest.mark.parametrize("method", list(ENCODER_AND_HEAD))
def test_one_representation_serves_clustering_runs_of_other_k(method, tmp_path):
    """A run of the representation stage alone, then runs of two k from it (train.representation_from): each starts
    from its encoder, mines neighbours in its features and clusters."""
    images = digits_source().images[:200, ..., None]
    own = {"pretrain_epochs": 1} if method == "dcec" else {}
    source = TrainConfig.of(method=method, k=10, joint_epochs=0, batch_size=100, contrast_epochs=1, **own)
    saved = []
    engine.fit(images, source, log=lambda s: None, on_epoch=lambda e, m, f: saved.append(checkpoints.save(
        f(), str(tmp_path / "rep" / f"checkpoint_{e:06d}"))))
    learnt = checkpoints.load(saved[-1])["model"]
    encoder = ENCODER_AND_HEAD[method][0]
    x = engine.device_images(images, "cpu")
    for k in (6, 12):
        cfg = TrainConfig.of(method=method, k=k, joint_epochs=4 if method == "vc" else 1, batch_size=50,
                             neighbours=5, over_cluster=1, representation_from=str(tmp_path / "rep"), **own)
        started = engine.fit(images, cfg, log=lambda s: None, until=0).state_dict()  # before its first step
        copied = [key for key in started if key.startswith(encoder)]
        assert copied and all(torch.equal(started[key], learnt[key]) for key in copied)
        model = engine.fit(images, cfg, log=lambda s: None)
        assert engine.predict_all(model, x)[0].shape == (200, k)
        assert engine.representation_of(cfg, model, x) is not None  # the label-free scores read its features
    if method == "nmm":  # it trained no clusters: nothing to label by
        assert checkpoints.load(saved[-1])["representation_only"]
        with pytest.raises(ValueError, match="learnt a representation alone"):
            checkpoints.load_finished(saved[-1])


def test_a_representation_from_another_method_or_encoder_is_refused_by_name(tmp_path):
    images = digits_source().images[:100, ..., None]
    states = []
    engine.fit(images, TrainConfig.of(method="nmm", k=10, joint_epochs=0, contrast_epochs=1, batch_size=100),
               log=lambda s: None, on_epoch=lambda e, m, f: states.append(f()))
    torch.save(states[-1], tmp_path / "rep.pt")  # a checkpoint file, as benchmarks/quality.py keeps a run
    source = str(tmp_path / "rep.pt")
    with pytest.raises(ValueError, match="is a nmm run .* this run is vc"):
        engine.fit(images, TrainConfig.of(method="vc", k=6, joint_epochs=1, representation_from=source))
    with pytest.raises(ValueError, match="its encoder does not fit"):
        engine.fit(images, TrainConfig.of(method="nmm", k=6, joint_epochs=1, conv_widths=(16, 32),
                                          representation_from=source))
    with pytest.raises(ValueError, match="method iic with encoder conv learns no representation"):
        TrainConfig.of(method="iic", representation_from=source)


def test_neighbour_agreement_is_least_where_the_posteriors_match_the_neighbours_and_selflabels_only_the_confident():
    scan = Scan(NMMSettings(neighbours=2, contrast_epochs=1, selflabel_threshold=0.9), "em", 1, 8, colour=False)
    own = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98]])
    scan.knn = torch.tensor([[1, 1], [0, 0], [1, 1]])  # image 0's and 2's neighbour: 1; image 1's: 0
    scan.own, scan.bank = own, own
    idx = torch.arange(3)
    agreeing = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]))
    against = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]))
    assert scan.agreement(agreeing, idx) < scan.agreement(against, idx)
    three_heads = agreeing[:, None].expand(-1, 3, -1)  # one value per sub-head
    torch.testing.assert_close(scan.agreement(three_heads, idx), scan.agreement(agreeing, idx).expand(3))
    # only images 0 and 2 are confident: their own clusters (0 and 1) are the labels, image 1 counts for nothing
    log_p = torch.log(torch.tensor([[0.7, 0.3], [0.01, 0.99], [0.4, 0.6]]))
    expected = -(log_p[0, 0] + log_p[2, 1]) / 2
    torch.testing.assert_close(scan.selflabel(log_p, idx), expected)


def test_modularity_on_representation_neighbours_follows_the_representation_not_the_pixels():
    """Pixels that group by brightness, features that group by class: the label-free scores on the features find the
    classes, and say which space they scored in; the neighbours' purity is there for information."""
    from clustering import metrics

    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1], 100)
    bright = rng.permutation(classes)  # brightness, unrelated to class
    pixels = (bright[:, None, None, None] * 200 + rng.integers(0, 40, (200, 4, 4, 1))).astype(np.uint8)
    feats = (np.eye(2)[classes] * 5 + rng.normal(size=(200, 2))).astype(np.float32)
    on_pixels, on_features = metrics.LabelFreeScores(pixels), metrics.LabelFreeScores(feats)
    assert (on_pixels.space, on_features.space) == ("pixels", "representation")
    assert on_features.modularity(classes) > 0.4 > on_pixels.modularity(classes)
    assert on_features.purity(classes) > 0.95 and on_pixels.purity(classes) < 0.7


def train_on_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo workers: NMM's whole representation path on its half of 600 digits, from the better of two
    starts."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        images = digits_source().images[rank * 300:(rank + 1) * 300, ..., None]
        cfg = TrainConfig.of(method="nmm", k=10, joint_epochs=2, batch_size=128, contrast_epochs=2, neighbours=5,
                             selflabel_epochs=2, restarts=2, restart_epochs=3)
        losses, starts = [], []
        model = engine.fit(images, cfg, Comm(rank, 2, dist.all_reduce), log=lambda s: None,
                           on_epoch=lambda e, m, f: (losses.append(m["loss"]),
                                                     starts.append(m.get("start_modularity"))))
        picked = [s for s in starts if s]  # the starts' scores, in the metrics of the first epoch after the pick
        torch.save({"weights": model.state_dict(), "losses": losses, "starts": picked}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_representation_path_on_two_workers_keeps_their_weights_equal(tmp_path):
    """Neighbours over both workers' images, the gathered bank read by global id, self-labelling on each worker's
    own posteriors: both workers end with the same weights and head, as averaged gradients from one start must give
    (batch norm's running statistics are each worker's own, as ever). Each start is scored on the representation's
    neighbour graph of rows gathered from both workers, so both score the starts alike and continue the same one."""
    out = str(tmp_path / "trained")
    mp.start_processes(train_on_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
    a, b = (torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1))
    assert a["losses"] == b["losses"] and all(np.isfinite(a["losses"]))  # the epoch losses are all-reduced
    assert a["starts"] == b["starts"] and len(a["starts"]) == 1  # reported once, in the first epoch after the pick
    assert len(a["starts"][0]) == 2 and a["starts"][0][0] != a["starts"][0][1]
    shared = [name for name in a["weights"] if "running_" not in name and "num_batches" not in name]  # batch norm's
    assert all(torch.allclose(a["weights"][name], b["weights"][name]) for name in shared)  # statistics: each worker's
