"""The Python API, in scikit-learn's manner: one process, no Ray.

    from clustering import DeepClusterer
    est = DeepClusterer("nmm", k=10, joint_epochs=30, heads=2).fit(images)   # uint8 (N, H, W[, C])
    est.labels_, est.predict(new_images), est.predict_proba(paths), est.transform(pil_images)
    est.save("runs/mine");  DeepClusterer.load("outputs/demo/runs/nmm-20261203-101500")  # a run or checkpoint

Images are an array (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or floats in 0..1 (other ranges, NaN and infinity
are refused, naming what was found); one (H, W) image; or a list of arrays, file paths or s3:// URIs, encoded bytes,
or PIL images (each file read once). All go through the shards' input policy (shards.POLICY) to the model's
mode and side, which `fit` chooses from the images as the shard job does (or `image_size=`).
Training is `engine.fit`, the loop every Ray Train worker runs; a saved model is the train job's checkpoint, so
`dicl label` and `dicl predict` take it, and `load` takes the train job's runs.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from . import checkpoints, engine
from .data import shards, storage
from .config import ConfigError, TrainConfig, describe
from .data.inputs import device_images
from .model.methods import predict_all


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_pil(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(_as_uint8_array(item[None])[0].squeeze(-1) if item.ndim == 2 or item.shape[-1] == 1
                               else _as_uint8_array(item[None])[0])
    return Image.open(io.BytesIO(_as_bytes(item)))


def _as_bytes(item: Any) -> bytes:
    """An encoded image's bytes: given, or read from a path or URI (naming it when it cannot be read)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if not isinstance(item, (str, os.PathLike)):
        raise ValueError(f"an image must be an array, a PIL image, encoded bytes, or a path or URI; got "
                         f"{type(item).__name__}")
    return storage.read_bytes(str(item))


def as_inputs(images: Any) -> Any:
    """Images as given, in a form read once: an array stays one (a list of same-shape arrays becomes one), PIL
    images stay open, paths and URIs are read into bytes."""
    if isinstance(images, np.ndarray):
        return images[None] if images.ndim == 2 else images  # (H, W): one gray image
    if isinstance(images, (Image.Image, str, bytes, os.PathLike)):
        images = [images]  # one image
    items = list(images)
    if not items:
        raise ValueError("no images given")
    if all(isinstance(i, np.ndarray) for i in items) and len({i.shape for i in items}) == 1:
        return np.stack(items)
    return [i if isinstance(i, Image.Image) else _as_pil(i) if isinstance(i, np.ndarray) else _as_bytes(i)
            for i in items]


def _as_uint8_array(images: np.ndarray) -> np.ndarray:
    """An array of images as uint8 (N, H, W, C). Floats must be finite and in 0..1: anything else is refused,
    naming what was found (never a silent mis-scale)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1, 3 or 4; got {x.shape}")
    if not len(x):
        raise ValueError("no images given")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "biuf":
        raise ValueError(f"images must be numbers (uint8, or floats in 0..1); got dtype {x.dtype}")
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{len(bad)} of {len(x)} images hold NaN or infinite values (the first: image {bad[0]}): "
                         "clean or drop them first")
    lo, hi = float(x.min()), float(x.max())
    if x.dtype.kind == "f" and (lo < 0 or hi > 1):
        raise ValueError(f"float images must lie in 0..1, and these run {lo:g}..{hi:g}: scale them (e.g. "
                         f"images / {hi:g}) or pass uint8 0..255")
    if x.dtype.kind in "biu" and (lo < 0 or hi > 255):
        raise ValueError(f"integer images must lie in 0..255, and these run {lo:g}..{hi:g}")
    return np.round(x * 255.0 if x.dtype.kind == "f" else x).astype(np.uint8)


def shapes_of(images: Any) -> Counter:
    """(height, width, mode) counts of the images, as the shard job records them (headers only for files)."""
    if isinstance(images, np.ndarray):
        x = _as_uint8_array(images)
        return Counter({(x.shape[1], x.shape[2], {1: "L", 3: "RGB", 4: "RGBA"}[x.shape[3]]): len(x)})
    shapes = Counter()
    for item in images:
        im = _as_pil(item)
        shapes[(im.height, im.width, im.mode)] += 1
        if im is not item:
            im.close()  # opened here from bytes: the caller's own images stay open
    return shapes


def to_images(images: Any, mode: str, side: int) -> np.ndarray:
    """Images of any accepted kind -> uint8 (N, side, side, C) by the input policy."""
    images = as_inputs(images)
    if isinstance(images, np.ndarray):
        x = _as_uint8_array(images)
        if x.shape[1:] == (side, side, 1 if mode == "L" else 3):
            return x
        return np.stack([shards.apply_policy(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), mode, side)
                         for a in x])
    out = []
    for item in as_inputs(images):
        if isinstance(item, Image.Image):
            out.append(shards.apply_policy(item, mode, side))
        else:
            out.append(shards.decode_image(item, mode, side))
    return np.stack(out)


class DeepClusterer:
    """A deep clustering model: `method` and `k`, and any other train setting as a keyword: a shared one
    (clustering/config.py's TrainConfig) or one of the method's own (clustering/model/methods/), e.g.
    DeepClusterer("dcec", k=10, pretrain_epochs=20, joint_epochs=20, seed=1). A setting the method does not have
    is refused, naming it.

    Fitted attributes: labels_ (clusters of the fitted images), config_ (the TrainConfig), model_ (the torch
    module), image_size_ and channels_ (the model's input), history_ (one dict per epoch)."""

    def __init__(self, method: str = "nmm", k: int = 10, *, device: str = "auto", verbose: bool = False,
                 **settings: Any):
        self.method, self.k, self.device, self.verbose, self.settings = method, k, device, verbose, settings

    def get_params(self, deep: bool = True) -> dict:
        return {"method": self.method, "k": self.k, "device": self.device, "verbose": self.verbose, **self.settings}

    def _config(self, image_size: int) -> TrainConfig:
        try:
            return TrainConfig.of("DeepClusterer", **{**self.settings, "method": self.method, "k": self.k,
                                                      "image_size": image_size})
        except ValidationError as e:
            raise ConfigError(describe(e, "DeepClusterer settings")) from None

    def fit(self, images: Any, y: Any = None, log: Callable[[str], None] | None = None) -> "DeepClusterer":
        """Train from scratch on the images (y is ignored: clustering uses no labels)."""
        images = as_inputs(images)  # each file read once: for its shape, then its pixels
        chosen = shards.choose_image(shards.shape_summary(shapes_of(images)))
        side = self.settings.get("image_size") or chosen["side"]
        cfg = self._config(side)
        mode = "L" if chosen["channels"] == 1 else "RGB"
        x = to_images(images, mode, side)
        if cfg.k > len(x):
            raise ValueError(f"k={cfg.k} is more than the {len(x)} images: a clustering needs more images than clusters")
        final: dict = {}

        def keep(epoch: int, metrics: dict, state_fn) -> None:
            if metrics["stage"] == "final":
                final.update(state_fn())

        device = resolve_device(self.device)
        say = log or (print if self.verbose else (lambda s: None))
        model = engine.fit(x, cfg, device=device, on_epoch=keep, log=say)
        self._set_fitted(final, model, device)
        self.labels_ = self.predict(x)
        return self

    def fit_predict(self, images: Any, y: Any = None) -> np.ndarray:
        return self.fit(images).labels_

    def _set_fitted(self, state: dict, model: torch.nn.Module, device: torch.device) -> None:
        self.state_, self.model_, self.device_ = state, model.to(device).eval(), device
        spec = state["spec"]
        self.config_ = TrainConfig(**spec["config"])
        self.method, self.k = spec["method"], self.config_.k
        self.image_size_, self.channels_ = spec["side"], spec["channels"]
        self.history_ = list(state.get("history", []))

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this DeepClusterer is not fitted: call fit(images) or DeepClusterer.load(path) first")

    def posteriors(self, images: Any, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(cluster posteriors (N, k), embeddings (N, D)) in one forward pass."""
        self._check_fitted()
        x = to_images(images, "L" if self.channels_ == 1 else "RGB", self.image_size_)
        probs, z = predict_all(self.model_, device_images(x, self.device_), batch_size)
        return probs.float().cpu().numpy(), z.float().cpu().numpy()

    def predict_proba(self, images: Any) -> np.ndarray:
        return self.posteriors(images)[0]

    def predict(self, images: Any) -> np.ndarray:
        return self.predict_proba(images).argmax(1)

    def transform(self, images: Any) -> np.ndarray:
        """The images' embeddings: the codes the cluster head reads."""
        return self.posteriors(images)[1]

    def save(self, folder: str) -> str:
        """Write the model as the train job's checkpoint (folder/model.pt); returns the folder."""
        self._check_fitted()
        return checkpoints.save(self.state_, folder)

    @classmethod
    def load(cls, uri: str, device: str = "auto") -> "DeepClusterer":
        """A fitted model from a checkpoint folder or a run folder (its newest checkpoint), local or s3://."""
        path = checkpoints.resolve(storage.absolute(uri))
        state = checkpoints.load_finished(path)
        _, model = engine.build_from_spec(state["spec"])
        model.load_state_dict(state["model"])
        est = cls(state["spec"]["method"], state["spec"]["config"]["k"], device=device)
        est._set_fitted(state, model, resolve_device(device))
        est.checkpoint_ = path
        return est
