"""The same content however it was captured: levels stretched per channel, and views chosen by what the colour is."""
import numpy as np
import torch

from clustering import engine
from clustering.config import TrainConfig
from clustering.data.sources import digits_source
from clustering.model import augment, levels
from clustering.model.methods import NMM, predict_all, to_float


def digits_u8() -> tuple[np.ndarray, np.ndarray]:
    src = digits_source()
    return src.images[..., None], src.labels  # (N, 8, 8, 1) uint8, the brightest pixel white in nearly every image


def tinted(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gray images (N, H, W, 1) as colour images with a random colour cast and exposure per image (0.5..1 a channel)."""
    tint = np.random.default_rng(seed).uniform(0.5, 1.0, (len(images), 1, 1, 3))
    return np.round(images.astype(np.float32) * tint).astype(np.uint8)


def test_a_dim_or_tinted_capture_becomes_the_clean_image_and_dark_channels_are_stretched_at_most_4x():
    clean, _ = digits_u8()
    clean = clean[clean.reshape(len(clean), -1).max(1) == 255][:200]
    x = to_float(engine.device_images(tinted(clean), "cpu"))
    want = to_float(engine.device_images(clean, "cpu")).expand(-1, 3, -1, -1)
    assert (x - want).abs().max() < 0.02  # the tint's rounding only: each channel is the clean image again
    dark = torch.full((1, 1, 4, 4), 10, dtype=torch.uint8)
    assert to_float(dark).max().item() == np.float32(10 / 255 * levels.MAX_GAIN)


def test_colour_that_is_only_a_cast_is_not_counted_as_colour():
    clean, _ = digits_u8()
    assert not levels.colourful(engine.device_images(clean, "cpu"))  # gray
    assert not levels.colourful(engine.device_images(tinted(clean), "cpu"))  # gray with a colour cast
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)  # every pixel its own colour
    assert levels.colourful(engine.device_images(photos, "cpu"))
    assert levels.colourful(torch.zeros(5, 64, 1, 1))  # a backbone's features: the question does not apply


def test_views_follow_the_content_and_a_run_records_its_choice():
    cfg = TrainConfig.of(method="nmm", joint_epochs=1)
    assert NMM(cfg, 3, 16, colour=False).view is augment.digits_view
    assert NMM(cfg, 3, 16, colour=True).view is augment.rgb_view
    images, _ = digits_u8()
    specs = []
    engine.fit(tinted(images[:300]), cfg, on_epoch=lambda e, m, state_fn: specs.append(state_fn()["spec"]),
               log=lambda s: None)
    assert specs[-1]["channels"] == 3 and specs[-1]["colour"] is False
    method, _ = engine.build_from_spec({**specs[-1], "colour": True})
    assert method.view is augment.rgb_view  # the spec, not the code's default, decides for a resumed run
    method, _ = engine.build_from_spec({k: v for k, v in specs[-1].items() if k != "colour"})
    assert method.view is augment.rgb_view  # checkpoints from before the choice keep the colour views


def test_a_trained_model_gives_a_dimmed_and_tinted_copy_the_clusters_of_the_clean_images():
    images, _ = digits_u8()
    model = engine.fit(images, TrainConfig.of(method="nmm", joint_epochs=2), log=lambda s: None)
    dimmed = np.round(images * 0.6).astype(np.uint8)
    clean = predict_all(model, engine.device_images(images, "cpu"))[0].argmax(1)
    seen = predict_all(model, engine.device_images(dimmed, "cpu"))[0].argmax(1)
    assert (clean == seen).float().mean() > 0.98
