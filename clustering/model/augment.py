"""Augmentation on the device, on float (B, C, H, W) batches: no CPU round trip per step. Photographs get kornia's
batched augmentations; gray images a small affine and noise, written here: two ops, and the 8 px digits' views at a
fifth of kornia's cost on CPU."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, degrees: float = 10.0, translate: float = 0.1,
                  scale: tuple[float, float] = (0.9, 1.1), generator: torch.Generator | None = None) -> torch.Tensor:
    """Small random rotation, shift and zoom per image (the 'small affine' for digits)."""
    b = len(x)
    rand = lambda: torch.rand(b, device=x.device, generator=generator)  # noqa: E731
    angle = (rand() * 2 - 1) * math.radians(degrees)
    s = scale[0] + rand() * (scale[1] - scale[0])
    tx, ty = (rand() * 2 - 1) * translate * 2, (rand() * 2 - 1) * translate * 2  # grid units span [-1, 1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def gaussian_noise(x: torch.Tensor, std: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, device=x.device, generator=generator)).clamp_(0, 1)


def digits_view(x: torch.Tensor) -> torch.Tensor:
    return gaussian_noise(random_affine(x))


@lru_cache(maxsize=None)
def photo_views(strength: str, height: int, width: int) -> torch.nn.Module:
    """kornia's batched augmentations for photographs of height x width px, built once per size (they hold no
    weights, so one module serves every device; kornia draws their parameters on the CPU and copies them over without
    waiting on the device).
    - 'clustering': crop (0.2..1 of the area) + flip, colour jitter (0.4) at p 0.8, grayscale at p 0.2.
    - 'representation', SimCLR's in full: crop (0.08..1) + flip, colour jitter (0.4) with hue (0.1) at p 0.8,
      grayscale at p 0.2, and blur at p 0.5 with a kernel of a tenth of the side, on images larger than CIFAR's
      32 px (SimCLR leaves blur out there: it erases what little there is)."""
    import kornia.augmentation as K  # here, not at import: training workers that see no photographs skip it

    full = strength == "representation"
    steps = [K.RandomResizedCrop((height, width), scale=(0.08 if full else 0.2, 1.0), cropping_mode="resample"),
             K.RandomHorizontalFlip(),
             K.ColorJitter(0.4, 0.4, 0.4, 0.1 if full else 0.0, p=0.8),
             K.RandomGrayscale(p=0.2)]
    side = min(height, width)
    if full and side > 32:
        steps.append(K.RandomGaussianBlur(max(3, (side // 10) | 1), (0.1, 2.0), p=0.5))  # odd
    return torch.nn.Sequential(*steps)


def rgb_view(x: torch.Tensor) -> torch.Tensor:
    """The views a clustering objective compares on colour images (`photo_views`)."""
    return photo_views("clustering", *x.shape[-2:])(x)


def simclr_view(x: torch.Tensor) -> torch.Tensor:
    """SimCLR's augmentations at full strength, for learning a representation (`photo_views`)."""
    return photo_views("representation", *x.shape[-2:])(x)


def feature_view(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    """A view of backbone features (B, D, 1, 1): dropout of a fraction p of the dimensions (rescaled). Pixels are
    gone once features are cached; what two views should agree on is then the features that survive."""
    keep = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


def view_for(channels: int, strength: str = "clustering", side: int | None = None, colour: bool = True):
    """The augmentation of a method: 'clustering' (the views its clustering objective compares) or
    'representation' (full-strength SimCLR for colour images, to learn features that ignore colour and layout).
    Inputs of side 1 are a backbone's features: `feature_view` either way. Gray images, and colour images whose
    colour is only a cast (colour=False, `levels.colourful`), get the gray views: crops, flips and colour jitter
    are for photographs."""
    if side == 1:
        return feature_view
    if channels == 1 or not colour:
        return digits_view
    return simclr_view if strength == "representation" else rgb_view
