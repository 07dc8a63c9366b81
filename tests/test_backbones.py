"""Pretrained backbones and the feature cache (issue 36): weights from a file or s3://, frozen and fine-tuned, the
cache computed once and read by tune, train and label, refused for another backbone; DDP against the flat
all-reduce. A torchvision ResNet-18 made here stands for pretrained weights (no download)."""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clustering import engine
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.data import features, storage
from clustering.data.sources import digits_source
from clustering.estimator import DeepClusterer
from clustering.model.backbones import WithBackbone, import_torchvision, pretrained
from clustering.model.levels import pixels_to_input
from infra.local_s3 import free_port
from jobs.cli import main
from tests.conftest import BUCKET


def resnet18_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return import_torchvision().models.resnet18().state_dict()  # with its classifier, as torchvision saves it


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(resnet18_state(0), path)
    return str(path)


def digits_u8(n: int) -> np.ndarray:
    return digits_source().images[:n, ..., None]


def test_weights_load_from_a_file_and_a_file_of_another_net_is_refused(weights, tmp_path):
    backbone = pretrained("torchvision:resnet18", 32, weights)
    assert torch.equal(backbone.net.conv1.weight, resnet18_state(0)["conv1.weight"])  # loaded, classifier dropped
    assert backbone(torch.rand(2, 1, 8, 8)).shape == (2, 512)  # gray to RGB, resized to 32, normalised
    with pytest.raises(ValueError, match="does not fit train.encoder=torchvision:resnet50.*missing"):
        pretrained("torchvision:resnet50", 32, weights)
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="junk.pt is not a state dict"):
        pretrained("torchvision:resnet18", 32, str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="no classification model 'resnet7'"):
        pretrained("torchvision:resnet7", 32, "")


def test_a_timm_backbone_takes_its_own_state_dict_and_the_estimator_clusters_on_it(tmp_path):
    source = pretrained("timm:resnet18", 16, "")
    torch.save(source.net.state_dict(), tmp_path / "timm.pt")
    backbone = pretrained("timm:resnet18", 16, str(tmp_path / "timm.pt"))
    assert torch.equal(backbone.net.conv1.weight, source.net.conv1.weight) and backbone.out_dim == 512
    x = digits_u8(200)
    est = DeepClusterer("kmeans", n_clusters=5, encoder="timm:resnet18", weights=str(tmp_path / "timm.pt"),
                        backbone_size=16).fit(x)
    assert len(set(est.predict(x))) == 5


def test_the_fingerprint_follows_the_weights_and_the_input_policy(weights, tmp_path):
    torch.save(resnet18_state(1), tmp_path / "other.pt")
    one = pretrained("torchvision:resnet18", 32, weights)
    assert one.fingerprint(1, 8) == pretrained("torchvision:resnet18", 32, weights).fingerprint(1, 8)
    assert one.fingerprint(1, 8) != pretrained("torchvision:resnet18", 32, str(tmp_path / "other.pt")).fingerprint(1, 8)
    assert one.fingerprint(1, 8) != one.fingerprint(1, 16) != one.fingerprint(3, 16)
    assert one.fingerprint(1, 8) != pretrained("torchvision:resnet18", 64, weights).fingerprint(1, 8)


@pytest.mark.parametrize("backbone_lr", [0.0, 1e-4])
def test_the_estimator_clusters_on_a_frozen_or_fine_tuned_backbone_and_its_checkpoint_is_self_contained(
        weights, tmp_path, backbone_lr):
    x = digits_u8(300)
    est = DeepClusterer("nmm", n_clusters=5, encoder="torchvision:resnet18", weights=weights, backbone_size=16,
                        backbone_lr=backbone_lr, joint_epochs=2, batch_size=64).fit(x)
    model = est.model_
    assert isinstance(model, WithBackbone) and len(set(est.predict(x))) > 1
    frozen = torch.equal(model.backbone.net.conv1.weight.cpu(), resnet18_state(0)["conv1.weight"])
    assert frozen == (backbone_lr == 0)  # fine-tuning moved the backbone's weights, freezing kept them
    loaded = DeepClusterer.load(est.save(str(tmp_path / "run")))  # the weights file is not read again
    assert np.array_equal(loaded.predict(x), est.predict(x))
    feats = model.backbone(pixels_to_input(torch.from_numpy(x).permute(0, 3, 1, 2))).detach().numpy()  # as it sees them
    assert np.array_equal(loaded.posteriors_of_features(feats)[0].argmax(1), est.predict(x))


def test_the_feature_cache_refuses_another_backbone_or_corpus():
    cache = {"fingerprint": "a" * 64, "content_hash": "c" * 64, "encoder": "torchvision:resnet18",
             "weights": "w.pt", "backbone_size": 224}
    assert features.check("cache", cache, "a" * 64, {"content_hash": "c" * 64}) is cache
    with pytest.raises(features.CacheMismatch, match="not by this run's backbone"):
        features.check("cache", cache, "b" * 64, {"content_hash": "c" * 64})
    with pytest.raises(features.CacheMismatch, match="from other shards"):
        features.check("cache", cache, "a" * 64, {"content_hash": "d" * 64})
    with pytest.raises(features.CacheMismatch, match="no feature cache at cache"):
        features.check("cache", None, "a" * 64, {"content_hash": "c" * 64})


SMALL = ["shard.samples_per_shard=600", "train.backbone_size=16", "train.joint_epochs=2", "train.batch_size=128",
         "train.cpus_per_worker=1", "train.checkpoint_every=2", "train.encoder=torchvision:resnet18"]


def test_pipeline_on_a_frozen_backbone_from_s3_computes_its_features_once_for_tune_train_and_label(
        ray_local, s3, weights, tmp_path, capsys):
    uri = f"s3://{BUCKET}/weights/resnet18.pt"
    storage.write_bytes(uri, open(weights, "rb").read())
    work = str(tmp_path / "work")
    args = ["pipeline", "configs/pretrained.yaml", f"work_dir={work}", f"train.weights={uri}", *SMALL,
            "tune.space={k: [8, 10]}", "tune.search=grid", "tune.num_samples=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cache = f"{work}/shards/features"
    assert "features: 1,797 images x 512 by torchvision:resnet18 at 16 px, computed" in out
    assert f"input features: 1,797 of 1,797 images x 512 from the cache {cache}" in out  # train read it
    assert f"label: reading the run's backbone's features from the cache {cache}" in out
    trials = json.loads(storage.read_bytes(f"{work}/tune/trials.json"))["trials"]
    assert len(trials) == 2 and {t["space"] for t in trials} == {"backbone features"}  # tune read it and scored on it
    written = {p: storage.modified(p) for p in storage.list_files(cache, ".parquet")}
    assert len(written) == 3 and features.read_manifest(cache)["rows"] == 1797

    # A second run keeps the cache as it is; a run with other weights is refused, naming both fingerprints.
    assert main(args + ["tune.space={}", "train.name=again"]) == 0
    assert "kept (computed by this backbone before)" in capsys.readouterr().out
    assert {p: storage.modified(p) for p in storage.list_files(cache, ".parquet")} == written
    other = str(tmp_path / "other.pt")
    torch.save(resnet18_state(1), other)
    assert main(["train", "configs/pretrained.yaml", f"work_dir={work}", f"train.weights={other}", *SMALL]) == 2
    assert "not by this run's backbone" in capsys.readouterr().err


def test_pipeline_fine_tunes_a_backbone_from_a_file(ray_local, weights, tmp_path, capsys):
    work = str(tmp_path / "work")
    assert main(["pipeline", "configs/pretrained.yaml", f"work_dir={work}", f"train.weights={weights}", *SMALL,
                 "train.backbone_lr=1.0e-4", "train.joint_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "features of" not in out and not storage.exists(f"{work}/shards/features")  # it reads the images
    assert "images labelled  1,797" in out


def fine_tune_on_rank(rank: int, port: int, out: str, gradients: str) -> None:
    """One of two gloo workers fine-tuning a ResNet-18 backbone under NMM on its half of 128 digits."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = TrainConfig.of(method="nmm", k=4, joint_epochs=1, batch_size=32, encoder="torchvision:resnet18",
                             weights=out + ".weights", backbone_size=16, backbone_lr=1e-3, gradients=gradients)
        model = engine.fit(digits_u8(128)[rank * 64:(rank + 1) * 64], cfg, Comm(rank, 2, dist.all_reduce),
                           log=lambda s: None)
        torch.save(model.state_dict(), f"{out}.{gradients}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_and_the_flat_all_reduce_give_the_same_weights_on_two_workers(tmp_path):
    out = str(tmp_path / "tuned")
    torch.save(resnet18_state(0), out + ".weights")
    for gradients in ("ddp", "flat"):
        mp.start_processes(fine_tune_on_rank, args=(free_port(), out, gradients), nprocs=2, start_method="spawn")
    runs = {(g, r): torch.load(f"{out}.{g}.{r}", weights_only=True) for g in ("ddp", "flat") for r in (0, 1)}
    start = resnet18_state(0)["conv1.weight"]
    assert not torch.allclose(runs["ddp", 0]["backbone.net.conv1.weight"], start)  # the backbone was trained
    learnt = [n for n in runs["ddp", 0] if "running_" not in n and "num_batches" not in n]
    for name in learnt:
        assert torch.allclose(runs["ddp", 0][name], runs["ddp", 1][name], atol=1e-6), name
        assert torch.allclose(runs["ddp", 0][name], runs["flat", 0][name], atol=1e-5), name


def test_ranks_read_their_parts_of_the_cache_and_train_sample_draws_across_all(tmp_path):
    base = str(tmp_path / "features")
    rows = {0: 5, 1: 7, 2: 4}
    for index, n in rows.items():  # part i holds the features i*100 + row, so each row says where it came from
        features.write_part(base, index, [f"k{index}-{r}" for r in range(n)], [""] * n,
                            np.array([[index * 100 + r, 0.0] for r in range(n)], np.float32), skipped=["bad"] * index)
    cache = {"dim": 2, "parts": [{"index": i, "rows": n} for i, n in rows.items()]}
    assert features.read_part(base, 2, ("key",)) == {"key": ["k2-0", "k2-1", "k2-2", "k2-3"], "skipped": ["bad"] * 2}
    whole = [features.load_rank(base, cache, r, 2)[:, 0] for r in (0, 1)]
    assert sorted(np.concatenate(whole)) == sorted(i * 100 + r for i, n in rows.items() for r in range(n))
    assert set(whole[1] // 100) == {1}  # parts round-robin: rank 1 has part 1
    drawn = [features.load_rank(base, cache, r, 2, n=6, seed=3)[:, 0] for r in (0, 1)]
    assert sum(map(len, drawn)) == 6 and not set(drawn[0]) & set(drawn[1])
    again = [features.load_rank(base, cache, r, 2, n=6, seed=3)[:, 0] for r in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again))  # every trial draws the same sample
