import copy

import numpy as np
import pytest
import torch

from clustering import engine, metrics
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.model.methods import NMM, RECIPES, Clusterer, build_method, fine_proba, predict_all, settings_keys
from clustering.data.sources import digits_source
from clustering.model.levels import pixels_to_input


@pytest.fixture(scope="module")
def digits():
    src = digits_source()
    return src.images[..., None], src.labels


def small(method: str = "dcec", **kw):
    """A short run of `method`, with shared keys and the method's settings by their flat names; settings that the
    method lacks are left out (the parametrized tests give one set for every method)."""
    kw = {"pretrain_epochs": 3, "joint_epochs": 2, "batch_size": 256, **kw}
    keys = set(TrainConfig.model_fields) | settings_keys(method)
    return TrainConfig.of(method=method, **{key: value for key, value in kw.items() if key in keys})


def test_fit_learns_and_predicts(digits):
    images, labels = digits
    seen = []
    model = engine.fit(images, small(pretrain_epochs=30, augment=False), on_epoch=lambda e, m, s: seen.append(m), log=lambda s: None)
    pretrain = [m["loss"] for m in seen if m["stage"] == "pretrain"]
    assert pretrain[-1] < pretrain[0]
    assert [m["stage"] for m in seen][-1] == "final"
    probs, z = predict_all(model, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert probs.shape == (len(images), 10) and z.shape == (len(images), 16)
    # far better than chance after a few epochs
    assert metrics.cluster_acc(labels, probs.argmax(1).numpy()) > 0.4


@pytest.mark.parametrize("method", ["dcec", "nmm"])
def test_resume_continues_from_the_checkpoint(digits, method):
    images, _ = digits
    states = {}
    cfg = small(method=method, joint_epochs=4, **({"heads": 2} if method == "nmm" else {}))  # nmm: π, sub-head too
    full = engine.fit(images, cfg, on_epoch=lambda e, m, s: states.setdefault(e, copy.deepcopy(s())), log=lambda s: None)
    resumed = engine.fit(images, cfg, resume=states[2], log=lambda s: None)
    # same seed, same data, same RNG state: the resumed run ends where the uninterrupted one did
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


# nmm clusters once EM starts; dcec in every stage (k-means on its codes), its representation stage too
@pytest.mark.parametrize("method, clustering_epochs", [("nmm", [3, 4]), ("dcec", [1, 2, 3, 4, 5, 6])])
def test_clusters_along_a_run_come_from_stages_that_cluster_and_leave_the_run_as_it_was(digits, method, clustering_epochs):
    images, _ = digits
    cfg = small(method=method, pretrain_epochs=2, contrast_epochs=2, joint_epochs=3)  # +2 AE for dcec
    x, seen, final = engine.device_images(images, "cpu"), {}, {}
    along = engine.while_clustering(cfg, 1, lambda epoch, state: seen.update({epoch: engine.clusters_now(state, x)}))

    def on_epoch(epoch: int, info: dict, state_fn) -> None:
        along(epoch, info, state_fn)
        if info["stage"] == "final":
            final.update(state_fn())
    model = engine.fit(images, cfg, on_epoch=on_epoch, log=lambda s: None)
    assert sorted(seen) == clustering_epochs  # up to the last epoch, whose clusters are the finished model's
    assert all(c.shape == (len(images),) and 0 <= c.min() and c.max() < cfg.k for c in seen.values())
    # at the end, the clusters "if the run ended here" are the finished run's
    assert torch.equal(engine.clusters_now(final, x), predict_all(model, x)[0].argmax(1))
    untouched = engine.fit(images, cfg, log=lambda s: None)  # looking drew no random numbers from the run
    for a, b in zip(model.state_dict().values(), untouched.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resume_says_when_it_keeps_the_checkpoints_learning_rate(digits):
    images, _ = digits
    states, lines = {}, []
    engine.fit(images, small(), on_epoch=lambda e, m, s: states.setdefault(e, copy.deepcopy(s())), log=lambda s: None)
    engine.fit(images, small(lr=1e-4), resume=states[3], log=lines.append)
    assert any("lr 0.001" in line and "train.lr=0.0001" in line for line in lines), lines


def test_nan_loss_stops_with_a_clear_error(digits):
    images, _ = digits
    with pytest.raises(engine.NonFiniteLoss, match="NaN/inf"):
        engine.fit(images, small(lr=1e30, augment=False), log=lambda s: None)


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="square"):
        engine.fit(np.zeros((4, 8, 12, 1), np.uint8), small(), log=lambda s: None)


@pytest.mark.parametrize("method, extra", [(m, {}) for m in RECIPES]  # every method in the registry
                         + [("nmm", {"instance_weight": 1.0, "heads": 3, "over_k": 30})])
def test_every_method_trains_and_gives_posteriors(digits, method, extra):
    images, _ = digits
    model = engine.fit(images[:512], small(method=method, pretrain_epochs=1, joint_epochs=1, code_dim=8, **extra),
                       log=lambda s: None)
    probs, _ = predict_all(model, torch.from_numpy(images[:512]).permute(0, 3, 1, 2))
    assert probs.shape == (512, 10) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(512))


def test_nmm_labels_with_the_sub_head_of_lowest_loss():
    recipe = NMM(small(method="nmm", heads=3, over_k=7), channels=1, side=8)
    model = recipe.build()
    x = torch.rand(5, 1, 8, 8)
    recipe.resp_sum, recipe.head_loss_sum = torch.ones(3, 10), torch.tensor([5.0, 2.0, 4.0])
    recipe.end_epoch(recipe.stages()[0], 0, model, Comm())
    assert int(model.head.choice_) == 1
    model.eval()
    torch.testing.assert_close(model.embed(x), model.net(x)[:, 10:20])  # the chosen sub-head's outputs


def test_nmm_epochs_report_the_labelling_sub_head(digits):
    images, _ = digits
    seen = []
    engine.fit(images[:512], small(method="nmm", heads=2), on_epoch=lambda e, m, s: seen.append(m), log=lambda s: None)
    assert all(m["head"] in (0, 1) and 0 < m["pi_min"] <= 1 for m in seen)


class FirstPixelCluster(Clusterer):
    """A stand-in model whose cluster for an image is the value of its first pixel."""

    def __init__(self, k: int):
        super().__init__()
        self.head = torch.nn.Module()
        self.head.predict_proba = lambda z: torch.nn.functional.one_hot((z * 255).round().long(), k).float()

    def embed(self, x):
        return x.flatten(1)[:, 0]


def with_white(first: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, 1, 2) of the given first pixels and a white second one, which the levels leave as they are."""
    return torch.stack([first, torch.full_like(first, 255)], 1).view(-1, 1, 1, 2)


def test_cluster_evenness_counts_the_models_clusters():
    model = FirstPixelCluster(4)
    equal = with_white(torch.arange(8, dtype=torch.uint8).remainder(4))
    assert engine.cluster_evenness(model, equal, Comm(), 4) == pytest.approx(1.0)
    uneven = with_white(torch.tensor([0, 0, 0, 1], dtype=torch.uint8))  # sizes 3, 1, 0, 0
    assert engine.cluster_evenness(model, uneven, Comm(), 4) == pytest.approx(metrics.evenness([3, 1, 0, 0]))


def test_restarts_continue_the_start_whose_clusters_have_the_highest_modularity_times_evenness(digits):
    images, _ = digits
    cfg = small(method="nmm", joint_epochs=3, restarts=3, restart_epochs=1)
    picked = engine.best_start(images, cfg, Comm(), "cpu", log=lambda s: None)
    # each start on its own, as a plain run of its seed stopped after one epoch, scored on the pixels' graph
    modularity, evenness, weights, x = [], [], [], torch.from_numpy(images).permute(0, 3, 1, 2)
    seen = (pixels_to_input(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # as the model sees them
    for r in range(3):
        start = cfg.model_copy(update={"seed": cfg.seed + engine.RESTART_SEED_STRIDE * r, "restarts": 1})
        model = engine.fit(images, start, log=lambda s: None, until=1)
        weights.append(copy.deepcopy(model.state_dict()))
        engine.end_of_run(model, start, x, Comm())  # as a finished run: normalisers, fine clusters merged into k
        clusters = predict_all(model, x)[0].argmax(1).numpy()
        modularity.append(metrics.knn_modularity(seen, clusters))
        evenness.append(metrics.evenness(np.bincount(clusters, minlength=10)))
    best = int(np.argmax(np.multiply(modularity, evenness)))
    assert len(set(np.round(modularity, 4))) == 3  # the starts differ, so the pick means something
    assert picked["history"][-1]["start_picked"] == best
    assert picked["history"][-1]["start_modularity"] == pytest.approx(modularity, abs=1e-4)
    assert picked["history"][-1]["start_evenness"] == pytest.approx(evenness, abs=1e-4)
    for name, value in picked["model"].items():
        torch.testing.assert_close(value.float(), weights[best][name].float())

    seen = []
    engine.fit(images, cfg, on_epoch=lambda e, m, s: seen.append(m), log=lambda s: None)
    assert [m["epoch"] for m in seen] == [1, 2]  # the picked start's epoch 0, then the rest of the run
    assert seen[0]["start_picked"] == best and "start_picked" not in seen[1]


def test_restarts_need_fewer_epochs_than_the_run_and_nmm_starts_reach_em(digits):
    images, _ = digits
    with pytest.raises(ValueError, match="restart_epochs=3"):
        engine.fit(images, small(method="nmm", joint_epochs=3, restarts=2, restart_epochs=3), log=lambda s: None)
    with pytest.raises(ValueError, match="contrast stage, before nmm clusters"):
        engine.fit(images, small(method="nmm", contrast_epochs=2, joint_epochs=3, restarts=2, restart_epochs=2),
                   log=lambda s: None)


def test_nmm_contrastive_pretraining_trains_features_then_em_the_mixture(digits):
    images, _ = digits
    cfg = small(method="nmm", contrast_epochs=2, joint_epochs=2)
    seen, states = [], {}

    def on_epoch(epoch, metrics, state_fn):
        seen.append(metrics)
        states[epoch] = copy.deepcopy(state_fn())
    engine.fit(images[:512], cfg, on_epoch=on_epoch, log=lambda s: None)
    assert [m["stage"] for m in seen] == ["contrast", "contrast", "em", "final"]
    torch.manual_seed(cfg.seed)
    built = engine.build_from_spec(engine.model_spec(cfg, 1, 8))[1].state_dict()
    for key in ("net.net.6.weight", "net.net.6.bias"):  # the mixture's output layer
        torch.testing.assert_close(states[1]["model"][key], built[key])  # the instance loss alone leaves it
        assert not torch.equal(states[2]["model"][key], built[key])  # EM trains it
    assert not torch.equal(states[1]["model"]["net.net.0.0.weight"], built["net.net.0.0.weight"])  # features learn


def test_a_loss_grown_by_orders_of_magnitude_is_a_diverged_run():
    stage = [{"stage": "em", "epoch": e, "loss": loss} for e, loss in enumerate([9.0, 8.0, 120.0])]
    engine.check_diverged(stage[:2])  # learning
    engine.check_diverged([{"stage": "em", "epoch": 0, "loss": 1e-4}, {"stage": "em", "epoch": 1, "loss": 0.5}])
    with pytest.raises(engine.Diverged, match="em loss grew from 9 in epoch 1 to 4.4e\\+07 in epoch 3"):
        engine.check_diverged(stage[:2] + [{"stage": "em", "epoch": 2, "loss": 4.4e7}])
    # another stage starts its own scale: a pretraining loss of 0.01, then a clustering loss of 5
    engine.check_diverged([{"stage": "pretrain", "epoch": 0, "loss": 0.01}, {"stage": "joint", "epoch": 1, "loss": 5}])


def test_a_run_that_collapses_to_one_cluster_is_a_diverged_run(digits):
    images, _ = digits
    with pytest.raises(engine.Diverged, match="collapsed: all 1,797 sampled images fall in one of its 10 clusters"):
        engine.fit(images, small("iic", lr=1000.0, joint_epochs=3), log=lambda s: None)


def test_fine_clusters_are_merged_into_k_on_the_neighbour_graph_and_the_checkpoint_keeps_the_merge(digits):
    images, _ = digits
    cfg = small(method="nmm", joint_epochs=3, over_cluster=3)
    final, last = {}, {}

    def on_epoch(epoch, metrics, state_fn):
        last.update(metrics)
        final.update(state_fn())
    model = engine.fit(images, cfg, on_epoch=on_epoch, log=lambda s: None)
    x = engine.device_images(images, "cpu")
    fine = fine_proba(model, x).argmax(1).numpy()
    assert model.head.log_pi_.shape[-1] == 30 and len(np.unique(fine)) > 10  # it learnt 3k fine clusters
    # the map: each fine cluster's cluster by modularity on the pixel graph (as the model sees them) of the engine's
    # seeded sample, with the fine clusters of the seeded views of it, recomputed here
    local = x[torch.from_numpy(metrics.sample_index(len(x), engine.MERGE_SAMPLE))]
    seen = (pixels_to_input(local) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    graph = metrics.LabelFreeScores(seen, sample=len(images))
    views = torch.stack([fine_proba(model, engine.views_of(local, seed=r)).argmax(1)
                         for r in range(engine.MERGE_VIEWS)], 1).numpy()
    expected = metrics.merge_by_modularity(graph.graph(), fine_proba(model, local).argmax(1).numpy()[graph.index],
                                           30, 10, views=views[graph.index], view_links=engine.MERGE_VIEW_LINKS)
    # views are read where the method trains them to agree: nmm's two-view consistency, not dcec's k-means on codes
    assert cfg.method.agrees_across_views and not small(method="nmm", consistency_weight=0).method.agrees_across_views
    assert not small(method="dcec").method.agrees_across_views
    assert torch.equal(model.merge_, torch.from_numpy(expected))
    probs = predict_all(model, x)[0]
    assert probs.shape == (len(images), 10) and torch.allclose(probs.sum(1), torch.ones(len(images)))
    assert torch.equal(probs.argmax(1), model.merge_[torch.from_numpy(fine)])  # an image's cluster: its fine one's
    assert last["stage"] == "final" and last["fine_clusters"] == len(np.unique(fine))  # in the run's last metrics
    assert torch.equal(engine.clusters_now(final, x), probs.argmax(1))  # the finished checkpoint labels alike
    # a checkpoint from before train.over_cluster learnt its k clusters directly
    old = engine.model_spec(small(method="nmm"), 1, 8)
    del old["config"]["over_cluster"]
    assert engine.build_from_spec(old)[1].head.log_pi_.shape[-1] == 10


def test_vc_decodes_each_image_under_its_likeliest_clusters_and_counts_the_rest_at_the_worst_of_those():
    torch.manual_seed(0)
    recipe = build_method(small(method="vc", k=8, decoded=3), 1, 8)
    model = recipe.build().eval()
    x = torch.rand(5, 1, 8, 8)
    h = model.features(x)
    logits = model.to_y(h)
    z = model.posterior_z(h)[2]
    decoded = []
    model.decoder.register_forward_hook(lambda module, inputs, out: decoded.append(len(inputs[0])))
    with torch.no_grad():
        exact = build_method(small(method="vc", k=8, decoded=8), 1, 8).reconstruction(model, x, z, logits)
        rec = recipe.reconstruction(model, x, z, logits)
    assert decoded == [5 * 8, 5 * 3]  # the exact sum decodes each image 8 times, the likeliest 3 clusters 3 times
    top = logits.topk(3, 1).indices
    assert torch.equal(rec.gather(1, top), exact.gather(1, top))
    rest = torch.ones_like(rec, dtype=torch.bool).scatter(1, top, False)
    worst = exact.gather(1, top).amax(1, keepdim=True).expand_as(rec)
    assert torch.equal(rec[rest], worst[rest]) and not torch.equal(rec, exact)
