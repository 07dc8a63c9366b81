"""IIC (clustering/model/methods/iic.py): its loss, and a run on the digits through the config, resumable like any."""
import copy
import math

import torch
from torch.nn.functional import one_hot

from clustering import engine, metrics
from clustering.config import PipelineConfig, load_config
from clustering.model.methods import predict_all
from clustering.model.methods.iic import mutual_information_loss
from clustering.data.sources import digits_source


def test_mutual_information_loss_is_lowest_when_two_views_agree_on_even_clusters():
    k, n = 4, 64
    sure = lambda labels: 50.0 * one_hot(labels, k).float()  # noqa: E731 (confident logits)
    even = torch.arange(n) % k
    agree = mutual_information_loss(sure(even), sure(even), entropy_weight=1.0)
    assert math.isclose(agree.item(), -math.log(k), abs_tol=1e-3)
    # views that say nothing of each other, and a collapse to one cluster, share no information
    independent = mutual_information_loss(sure(even), sure(torch.arange(n) // (n // k)), entropy_weight=1.0)
    collapsed = mutual_information_loss(sure(torch.zeros(n, dtype=torch.long)), sure(torch.zeros(n, dtype=torch.long)),
                                        entropy_weight=1.0)
    assert abs(independent.item()) < 1e-3 and abs(collapsed.item()) < 1e-3
    uneven = torch.where(even == 3, 0, even)  # three clusters where four would do: less information
    assert mutual_information_loss(sure(uneven), sure(uneven), entropy_weight=1.0) > agree


def test_iic_trains_from_the_config_clusters_the_digits_and_resumes_exactly():
    src = digits_source()
    images = src.images[..., None]
    cfg = load_config(PipelineConfig, None, ["train.method=iic", "train.joint_epochs=20", "train.seed=0"]).train
    states = {}
    model = engine.fit(images, cfg, on_epoch=lambda e, m, s: states.setdefault(e, copy.deepcopy(s())),
                       log=lambda s: None)
    pred = predict_all(model, engine.device_images(images, "cpu"))[0].argmax(1).numpy()
    # k-means on these pixels gives 0.79 (benchmarks/quality.py); IIC's invariance to the views does better
    assert metrics.cluster_acc(src.labels, pred) > 0.85 and len(set(pred)) == 10
    resumed = engine.fit(images, cfg, resume=states[9], log=lambda s: None)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)
