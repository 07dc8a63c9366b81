"""Pretrained backbones: a torchvision or timm architecture turned into a feature extractor, its weights from a file,
an s3:// URI or the model hub, and the fingerprint that ties a feature cache to it.

A backbone takes the methods' float images (B, C, H, W) in 0..1 at any side and applies its own input policy:
gray repeated to RGB, resized to `size`, normalised by the mean and std its weights were trained with. Its output,
(B, D), is what the methods cluster (as a D-channel 1x1 image, so every method's feature-space net reads it).
"""
from __future__ import annotations

import hashlib
import io

import torch
import torch.nn.functional as F
from torch import nn
from .levels import POLICY as LEVELS

LIBRARIES = ("torchvision", "timm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_backbone(encoder: str) -> bool:
    return encoder.partition(":")[0] in LIBRARIES and bool(encoder.partition(":")[2])


def import_torchvision():
    """torchvision, also where its compiled ops do not match the installed torch. The torchvision wheel on PyPI is
    built against CUDA torch; beside the CPU build of torch its ops library does not load, and its import then fails
    registering meta kernels for two ops that do not exist (pytorch/vision#9085). The models need none of its ops:
    declaring the two ops' schemas lets the import finish; calling them would still fail, naming the op."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import sys

        for op in ("nms", "qnms"):
            if not _has_schema(f"torchvision::{op}"):
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    return torchvision


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def architecture(encoder: str, hub: bool = False) -> tuple[nn.Module, int, tuple, tuple]:
    """(the net without its classifier, its feature width, mean, std) of `torchvision:NAME` or `timm:NAME`; with
    the hub's pretrained weights when `hub` (which downloads them), else random ones."""
    library, _, name = encoder.partition(":")
    if library == "timm":
        import_torchvision()  # timm imports torchvision: first through the CPU-build fix
        try:
            import timm
        except ImportError:
            raise ValueError(f"train.encoder={encoder} needs timm: pip install timm") from None
        net = timm.create_model(name, pretrained=hub, num_classes=0)
        cfg = net.pretrained_cfg or {}
        return net, net.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    tv = import_torchvision()
    if name not in tv.models.list_models(module=tv.models):
        raise ValueError(f"train.encoder={encoder}: torchvision has no classification model {name!r} (e.g. resnet18, "
                         "resnet50, vit_b_16, convnext_tiny)")
    net = strip_classifier(tv.models.get_model(name, weights="DEFAULT" if hub else None), encoder)
    return net, net.feature_width, IMAGENET_MEAN, IMAGENET_STD


def strip_classifier(net: nn.Module, encoder: str) -> nn.Module:
    """A torchvision classifier with its last linear layer replaced by the identity; `feature_width` records what
    that layer read."""
    for attr in ("fc", "head", "heads", "classifier"):
        layer = getattr(net, attr, None)
        if layer is None:
            continue
        if isinstance(layer, nn.Linear):
            net.feature_width = layer.in_features
            setattr(net, attr, nn.Identity())
            return net
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            net.feature_width = layer[-1].in_features
            layer[-1] = nn.Identity()
            return net
    raise ValueError(f"train.encoder={encoder}: cannot find its classifier layer to remove")


class Backbone(nn.Module):
    """A pretrained net as a feature extractor with its input policy: float images (B, C, H, W) in 0..1 -> (B, D)."""

    def __init__(self, encoder: str, size: int, hub: bool = False):
        super().__init__()
        self.encoder, self.size = encoder, size
        self.net, self.out_dim, mean, std = architecture(encoder, hub)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std).flatten(1)

    def fingerprint(self, channels: int, side: int) -> str:
        """What a feature cache must match: the architecture, the input policy (the images' channels, side and
        levels, the backbone's size and normalisation) and every weight."""
        h = hashlib.sha256(f"{self.encoder}|{channels}|{side}|{LEVELS}|{self.size}|{self.mean.tolist()}|"
                           f"{self.std.tolist()}".encode())
        for key, value in sorted(self.net.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def load_weights(backbone: Backbone, source: str) -> None:
    """Load a state dict (a file or s3:// URI written by torch.save: the whole classifier's, or the backbone's)
    into `backbone`. The classifier's last layer is dropped; any other missing or unexpected key is refused."""
    from ..data import storage

    try:
        state = torch.load(io.BytesIO(storage.read_bytes(source)), map_location="cpu", weights_only=True)
    except (storage.StorageError, OSError):
        raise
    except Exception as e:
        raise ValueError(f"train.weights={source} is not a state dict torch.load can read: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.net.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    extra = sorted(k for k in state if k not in own)
    classifier = {k for k in extra if k.rsplit(".", 1)[0] in {"fc", "head", "heads.head", "classifier.1",
                                                                "classifier.2", "classifier"}}
    missing, unexpected = sorted(k for k in own if k not in state), [k for k in extra if k not in classifier]
    if missing or unexpected:
        raise ValueError(f"train.weights={source} does not fit train.encoder={backbone.encoder}: "
                         + (f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"{len(unexpected)} not in the net (e.g. {unexpected[0]})" if unexpected else ""))
    backbone.net.load_state_dict({k: v for k, v in state.items() if k in own})


def load_pretrained(backbone: Backbone, weights: str) -> None:
    """Put a backbone's pretrained weights into it: `hub` (downloads them: needs network access), a file or an s3://
    URI; empty keeps the weights it has."""
    if weights == "hub":
        backbone.net.load_state_dict(architecture(backbone.encoder, hub=True)[0].state_dict())
    elif weights:
        load_weights(backbone, weights)


def pretrained(encoder: str, size: int, weights: str) -> Backbone:
    """A new backbone with its pretrained weights (`load_pretrained`): built with the hub's, or loaded."""
    backbone = Backbone(encoder, size, hub=weights == "hub")
    load_pretrained(backbone, "" if weights == "hub" else weights)
    return backbone


def is_features(x: torch.Tensor) -> bool:
    """Whether a batch is features (B, D, 1, 1) rather than images: no image is 1x1."""
    return x.shape[-2:] == (1, 1)


class WithBackbone(nn.Module):
    """A method's model (`inner`, built for D-channel 1x1 inputs) on a backbone's features. It takes images (the
    backbone runs) or features (from the cache; the backbone is skipped), so a checkpoint labels either. The backbone
    stays in eval mode: its batch-norm statistics are its pretraining's, whether it is frozen or fine-tuned."""

    def __init__(self, backbone: Backbone, inner: nn.Module):
        super().__init__()
        self.backbone, self.inner = backbone, inner

    @property
    def head(self) -> nn.Module:
        return self.inner.head

    def train(self, mode: bool = True) -> "WithBackbone":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x if is_features(x) else self.backbone(x)[:, :, None, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(self.features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.predict_proba(self.features(x))

    def cluster_proba(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.cluster_proba(z)
