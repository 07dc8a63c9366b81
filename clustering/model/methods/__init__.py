"""Each method a short recipe: encoder × non-clustering loss × clustering loss × head × schedule (seed 001's taxonomy).

A recipe builds its network, names its stages, and gives the loss of one batch in each stage; the engine
(engine.py) runs it in one process or on N workers alike. A method is one file here: its settings (a pydantic
model, `train.method.KEY`) and its recipe; the registry below names it. README.md here: how to add one.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from .autoencoder import DCEC, DEC, IDEC, AEKMeans, ClusterNet
from .base import Clusterer, Recipe, Settings, embed_all, fine_proba, method_name, predict_all, to_float
from .iic import IIC
from .kmeans import KMeansBaseline
from .nmm import NMM, MixtureNet
from .vc import VC

# The registry: a method's recipe, found by the name in its settings (train.method=NAME). First: the default.
RECIPES: dict[str, type[Recipe]] = {method_name(recipe.Settings): recipe for recipe in [
    NMM,  # the best-known on a small gray corpus (the digits: docs/RESULTS.md)
    DCEC,
    VC,
    IDEC,
    DEC,
    AEKMeans,
    KMeansBaseline,
    IIC,
]}
DEFAULT_METHOD = next(iter(RECIPES))


def _by_name(value: Any) -> Any:
    """`method: nmm` is `method: {name: nmm}`: the method with its default settings; settings without a name are
    the default method's."""
    if isinstance(value, str):
        return {"name": value}
    return {"name": DEFAULT_METHOD, **value} if isinstance(value, dict) else value


# train.method: one method's settings, selected by their `name` (a discriminated union of the registry's settings)
MethodSettings = Annotated[Union[tuple(recipe.Settings for recipe in RECIPES.values())],
                           Field(discriminator="name"), BeforeValidator(_by_name)]


def settings_keys(name: str) -> set[str]:
    """The settings of method `name` (empty for an unknown name)."""
    recipe = RECIPES.get(name)
    return set(recipe.Settings.model_fields) - {"name"} if recipe else set()


def methods_with(key: str) -> list[str]:
    return [name for name in RECIPES if key in settings_keys(name)]


def build_method(cfg, channels: int, side: int, colour: bool = True) -> Recipe:
    """The recipe of cfg's method. It learns cfg.fine_k clusters (k x train.over_cluster): its k, as it reads it."""
    if getattr(cfg, "fine_k", cfg.k) > cfg.k:
        cfg = cfg.model_copy(update={"k": cfg.fine_k, "over_cluster": 1})
    return RECIPES[cfg.method.name](cfg, channels, side, colour)


__all__ = ["RECIPES", "DEFAULT_METHOD", "MethodSettings", "Recipe", "Settings", "Clusterer", "ClusterNet",
           "MixtureNet", "NMM", "build_method", "embed_all", "fine_proba", "predict_all", "to_float", "settings_keys",
           "methods_with"]
