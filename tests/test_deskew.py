"""train.deskew: the label-free graph links handwriting by shape, not by slant."""
import numpy as np
import torch

from clustering import engine, metrics
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.model.deskew import deskew
from clustering.model.levels import pixels_to_input


def strokes(slant: float, strokes: int, side: int = 28) -> np.ndarray:
    """A uint8 (side, side) image of `strokes` parallel strokes, 3 columns apart, leaning by `slant` columns a row."""
    image = np.zeros((side, side))
    for r in range(5, side - 5):
        for s in range(strokes):
            c = side / 2 + 3 * (s - (strokes - 1) / 2) + slant * (r - side / 2)
            left = int(np.floor(c))
            image[r, left:left + 2] += 255 * np.array([left + 1 - c, c - left])  # anti-aliased
    return image.round().astype(np.uint8)


def test_deskew_stands_a_stroke_upright_and_keeps_dtype_and_blank_images():
    upright, leaning = strokes(0.0, 1), strokes(0.5, 1)
    x = torch.from_numpy(np.stack([upright, leaning, np.zeros_like(upright)]))[:, None]
    out = deskew(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    apart = (x[0].float() - x[1].float()).abs().sum()  # in pixels the two strokes share their middle only
    assert (out[0].float() - out[1].float()).abs().sum() < apart / 4  # deskewed they are nearly one stroke
    assert out[2].sum() == 0  # a blank image stays blank
    assert torch.equal(deskew(x.float()).round().to(torch.uint8), out)  # floats alike
    assert torch.equal(deskew(x.expand(-1, 3, -1, -1).contiguous()), out.expand(-1, 3, -1, -1))  # colour alike


def test_a_deskewed_graph_links_one_stroke_to_one_stroke_at_any_slant():
    slants = np.linspace(-0.6, 0.6, 12)
    images = np.stack([strokes(s, n) for n in (1, 2) for s in slants])[..., None]  # (24, 28, 28, 1)
    classes = np.repeat([0, 1], 12)
    raw = metrics.LabelFreeScores(images, sample=24, neighbours=3)
    straight = metrics.LabelFreeScores(images, sample=24, neighbours=3, deskew=True)
    assert raw.purity(classes) < 0.9  # a leaning stroke is nearer two strokes at its slant than one at another
    assert straight.purity(classes) == 1.0
    assert straight.modularity(classes) > raw.modularity(classes)
    features = np.random.default_rng(0).normal(size=(24, 5)).astype(np.float32)  # features are not deskewed
    assert np.array_equal(metrics.LabelFreeScores(features, deskew=True).points, metrics.LabelFreeScores(features).points)


def test_the_engine_graph_reads_deskewed_pixels_where_the_run_asks():
    slants = np.linspace(-0.6, 0.6, 20)
    images = np.stack([strokes(s, n) for n in (1, 2) for s in slants])[..., None]
    cfg = TrainConfig.of(method="nmm", joint_epochs=1, batch_size=64, k=2, deskew=True)
    model = engine.fit(images, cfg, log=lambda s: None)
    x = engine.device_images(images, "cpu")

    def graph(config):
        scores, _ = engine.graph_sample(model, config, x, Comm(), 100, lambda local: torch.zeros(len(local)))
        return scores

    local = x[torch.from_numpy(metrics.sample_index(len(x), 100))]  # every image (40 < 100), in the sample's order
    seen = (pixels_to_input(local) * 255).round()  # the pixels as the model sees them
    straight, raw = graph(cfg), graph(cfg.model_copy(update={"deskew": False}))
    assert np.allclose(straight.points, deskew(seen).round().flatten(1).numpy()[straight.index] / 255)
    assert np.allclose(raw.points, seen.flatten(1).numpy()[raw.index] / 255)
