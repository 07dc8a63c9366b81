"""The k-means-on-pixels baseline: no network, Lloyd's k-means on the flattened images."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from ...comm import Comm
from ..heads import KMeansHead
from .base import Clusterer, Recipe, Settings, fit_head


class KMeansSettings(Settings):
    name: Literal["kmeans"] = "kmeans"
    encoders: ClassVar = None  # no network


class PixelKMeans(Clusterer):
    """The k-means-on-pixels baseline as a model: the 'code' is the flattened image."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.head = KMeansHead(k, dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C*H*W)


class KMeansBaseline(Recipe):
    """k-means on pixels (Lloyd, k-means++ init, best of n_init), distributed like every other head."""

    Settings = KMeansSettings

    def build(self) -> PixelKMeans:
        return PixelKMeans(self.cfg.k, self.channels * self.side * self.side)

    def finish(self, model: PixelKMeans, images: torch.Tensor, comm: Comm) -> dict:
        return fit_head(model, images, comm, self.cfg.seed)
