"""Augmentation on the device, on float (B, C, H, W) batches: no CPU round trip per step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1),
                  generator: torch.Generator | None = None) -> torch.Tensor:
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
