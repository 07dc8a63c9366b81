"""The Python API, in scikit-learn's manner: one process, no Ray.

    from clustering import DeepClusterer
    est = DeepClusterer("nmm", n_clusters=10, joint_epochs=30, heads=2).fit(images)   # uint8 (N, H, W[, C])
    est.labels_, est.predict(new_images), est.predict_proba(paths), est.transform(pil_images)
    est.save("runs/mine");  DeepClusterer.load("outputs/demo/runs/nmm-20261203-101500")  # a run or checkpoint

A scikit-learn estimator (clone, Pipeline, GridSearchCV with a label-free scorer such as `modularity_scorer`).
Images: see clustering/data/given.py (arrays, flat rows with image_shape, files, bytes, PIL images). All go through
the shards' input policy (shards.POLICY) to the model's mode and side, which `fit` chooses from the images as the
shard job does (or `image_size=`).
Training is `engine.fit`, the loop every Ray Train worker runs; a saved model is the train job's checkpoint, so
`dicl label` and `dicl predict` take it, and `load` takes the train job's runs.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ValidationError
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from . import checkpoints, engine
from .data import shards, storage
from .data.given import as_inputs, data_range, image_array, shapes_of, to_images, to_uint8
from .config import ConfigError, TrainConfig, describe
from .data.inputs import device_images
from .model.methods import predict_all


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# scikit-learn's names for the config's (train.KEY): the estimator takes either, the config only its own.
SKLEARN_NAMES = {"n_clusters": "k", "random_state": "seed"}


class DeepClusterer(ClusterMixin, TransformerMixin, BaseEstimator):
    """A deep clustering model, as a scikit-learn estimator: `method` and `n_clusters`, and any other train setting
    as a keyword: a shared one (clustering/config.py's TrainConfig) or one of the method's own
    (clustering/model/methods/), e.g. DeepClusterer("dcec", n_clusters=10, pretrain_epochs=20, random_state=1).
    A setting the method does not have is refused, naming it. scikit-learn's names map onto the config's:
    n_clusters is train.k and random_state train.seed (`k=` and `seed=` are taken too). get_params/set_params,
    clone, Pipeline and GridSearchCV see every setting.

    image_shape: (H, W) or (H, W, C) of flat rows (N, H*W*C), as scikit-learn's data sets give images.

    Fitted attributes: labels_ (clusters of the fitted images), config_ (the TrainConfig), model_ (the torch
    module), image_size_ and channels_ (the model's input), history_ (one dict per epoch)."""

    def __init__(self, method: str = "nmm", n_clusters: int = 10, *, random_state: int | None = None,
                 image_shape: tuple[int, ...] | None = None, device: str = "auto", verbose: bool = False,
                 **settings: Any):
        self.method, self.n_clusters, self.random_state = method, n_clusters, random_state
        self.image_shape, self.device, self.verbose = image_shape, device, verbose
        self._settings = settings  # the other train settings, by their flat names (get_params lists them)

    def get_params(self, deep: bool = True) -> dict:
        return {**super().get_params(deep), **self._settings}

    def set_params(self, **params: Any) -> "DeepClusterer":
        own = self._get_param_names()
        super().set_params(**{k: v for k, v in params.items() if k in own})
        self._settings = {**self._settings, **{k: v for k, v in params.items() if k not in own}}
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True  # flat rows (with image_shape), as well as image arrays, files, PIL
        tags.non_deterministic = False  # random_state (train.seed) fixes every draw on one device
        return tags

    def _config(self, image_size: int) -> TrainConfig:
        values = {**self._settings, "method": self.method, "image_size": image_size}
        for sklearn_name, name in SKLEARN_NAMES.items():
            given, default = getattr(self, sklearn_name), inspect.signature(DeepClusterer).parameters[sklearn_name].default
            if name not in self._settings:
                if given is not None:
                    values[name] = given
            elif given != default and given != self._settings[name]:
                raise ConfigError(f"DeepClusterer: {sklearn_name}={given} and {name}={self._settings[name]} name one "
                                  f"setting (train.{name}): give one of them")
        try:
            return TrainConfig.of("DeepClusterer", **values)
        except ValidationError as e:
            raise ConfigError(describe(e, "DeepClusterer settings")) from None

    def fit(self, images: Any, y: Any = None, log: Callable[[str], None] | None = None) -> "DeepClusterer":
        """Train from scratch on the images (y is ignored: clustering uses no labels)."""
        images = as_inputs(images, self.image_shape)  # each file read once: for its shape, then its pixels
        self.value_range_ = None
        if isinstance(images, np.ndarray):  # checked once, and brought to pixels from the range it has
            array = image_array(images)
            self.value_range_ = data_range(array)  # kept: predict maps new images' values alike
            self.n_features_in_ = int(np.prod(array.shape[1:]))
            images = to_uint8(array)
        chosen = shards.choose_image(shards.shape_summary(shapes_of(images)))
        side = self._config(self._settings.get("image_size")).side_for(chosen["side"])
        cfg = self._config(side)
        x = to_images(images, "L" if chosen["channels"] == 1 else "RGB", side)
        if cfg.k > len(x):
            raise ValueError(f"n_samples={len(x)} images, and n_clusters={cfg.k}: a clustering needs more images than "
                             "clusters")
        if cfg.fine_k > len(x):
            raise ValueError(f"n_samples={len(x)} images, and {cfg.fine_k} fine clusters (n_clusters={cfg.k} x "
                             f"over_cluster={cfg.fine_k // cfg.k}) to merge into n_clusters: pass over_cluster=1")
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

    def fit_predict(self, images: Any, y: Any = None, **kwargs) -> np.ndarray:
        return self.fit(images).labels_

    def _set_fitted(self, state: dict, model: torch.nn.Module, device: torch.device) -> None:
        self.state_, self.model_, self.device_ = state, model.to(device).eval(), device
        spec = state["spec"]
        self.config_ = TrainConfig.of_spec(spec["config"])
        self.image_size_, self.channels_ = spec["side"], spec["channels"]
        self.history_ = list(state.get("history", []))

    def _check_fitted(self) -> None:
        check_is_fitted(self, "model_", msg="this DeepClusterer is not fitted: call fit(images) or "
                                            "DeepClusterer.load(path) first")

    def pixels(self, images: Any) -> np.ndarray:
        """The images as the model reads them: uint8 (N, side, side, C) by the input policy, values mapped from the
        range the fitted ones had."""
        return to_images(images, "L" if self.channels_ == 1 else "RGB", self.image_size_, self.image_shape,
                         self.value_range_)

    def posteriors(self, images: Any, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(cluster posteriors (N, k), embeddings (N, D)) in one forward pass."""
        self._check_fitted()
        return self._posteriors(device_images(self.pixels(images), self.device_), batch_size)

    def posteriors_of_features(self, features: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """`posteriors` of images given by their features (N, D) from the backbone of a model that has one (the
        feature cache's)."""
        self._check_fitted()
        if not hasattr(self.model_, "backbone"):
            raise ValueError("this model has no pretrained backbone: give it images, not features")
        return self._posteriors(torch.from_numpy(np.asarray(features, np.float32))[:, :, None, None].to(self.device_),
                                batch_size)

    def _posteriors(self, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        probs, z = predict_all(self.model_, x, batch_size)
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
        config = state["spec"]["config"]
        est = cls(config["method"]["name"], config["k"], random_state=config["seed"], device=device,
                  **trained_settings(config))
        est._set_fitted(state, model, resolve_device(device))
        est.value_range_ = None  # not recorded in a checkpoint: new images' values map from their own range
        est.checkpoint_ = path
        return est


def trained_settings(config: dict) -> dict:
    """The settings a run was trained with (a TrainConfig's dump), as the estimator's keywords: those that differ
    from the defaults, the method's own by their flat names; so that clone(loaded) trains that configuration."""
    defaults = TrainConfig.of("defaults", method=config["method"]["name"]).model_dump(mode="json")
    shared = {key: value for key, value in config.items()
              if key not in ("method", "k", "seed") and value != defaults.get(key)}
    own = {key: value for key, value in config["method"].items()
           if key != "name" and value != defaults["method"].get(key)}
    return {**shared, **own}


def modularity_scorer(estimator: DeepClusterer, images: Any, y: Any = None) -> float:
    """A label-free scorer for GridSearchCV (y is ignored): the modularity of the estimator's clusters of `images`
    on their nearest-neighbour graph, as the tune job scores trials with tune.metric=modularity: in the model's
    learnt representation where it has one, else in pixels (clustering.metrics.LabelFreeScores)."""
    return label_free_score(estimator, images, "modularity")


def modularity_x_evenness_scorer(estimator: DeepClusterer, images: Any, y: Any = None) -> float:
    """`modularity_scorer` times the evenness of the cluster sizes, the tune job's default score: where the clusters
    are merged from fine ones (train.over_cluster), modularity alone leans to k above the number of classes."""
    return label_free_score(estimator, images, "modularity_x_evenness")


def label_free_score(estimator: DeepClusterer, images: Any, name: str) -> float:
    from . import metrics

    x = estimator.pixels(images)
    learnt = engine.representation_of(estimator.config_, estimator.model_, device_images(x, estimator.device_))
    scores = metrics.LabelFreeScores(x if learnt is None else learnt, deskew=estimator.config_.deskew)
    return scores(estimator.predict(x), estimator.config_.k, (name,))[name]
