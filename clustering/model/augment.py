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


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.2, 1.0), flip: bool = True) -> torch.Tensor:
    """Crop a random area fraction in `scale` (aspect 3/4..4/3), resize back, mirror half the images."""
    b = len(x)
    area = scale[0] + torch.rand(b, device=x.device) * (scale[1] - scale[0])
    log_r = (torch.rand(b, device=x.device) * 2 - 1) * math.log(4 / 3)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=x.device) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, device=x.device) * 2 - 1) * (1 - h)
    sx = torch.where(torch.rand(b, device=x.device) < 0.5, -w, w) if flip else w
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float = 0.4, p: float = 0.8) -> torch.Tensor:
    """Random brightness, contrast and saturation per image, applied with probability p."""
    b = len(x)
    on = (torch.rand(b, 1, 1, 1, device=x.device) < p).float()
    rnd = lambda: 1 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * strength * on  # noqa: E731
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = x * rnd()  # brightness
    x = (x - gray.mean((2, 3), keepdim=True)) * rnd() + gray.mean((2, 3), keepdim=True)  # contrast
    x = (x - gray) * rnd() + gray  # saturation
    return x.clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    on = torch.rand(len(x), 1, 1, 1, device=x.device) < p
    return torch.where(on, gray.expand_as(x), x)


def rgb_view(x: torch.Tensor) -> torch.Tensor:
    """SimCLR-style view for natural images: crop + flip, colour jitter, grayscale."""
    return random_grayscale(color_jitter(random_resized_crop(x)))


# RGB -> YIQ and back: a hue shift is a rotation of the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


def hue_jitter(x: torch.Tensor, strength: float = 0.1, p: float = 0.8) -> torch.Tensor:
    """Rotate each image's hue by up to `strength` of a full turn, with probability p."""
    b = len(x)
    on = (torch.rand(b, device=x.device) < p).float()
    angle = (torch.rand(b, device=x.device) * 2 - 1) * strength * 2 * math.pi * on
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)  # (B, 3, 3)
    m = _YIQ_INV.to(x.device) @ rot @ _YIQ.to(x.device)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """SimCLR's blur: a kernel of about a tenth of the side, sigma drawn per image, with probability p. Images
    under 32 px are left as they are (SimCLR leaves blur out on CIFAR: it erases what little there is)."""
    b, c, h, w = x.shape
    if min(h, w) < 32:
        return x
    size = max(3, (min(h, w) // 10) | 1)  # odd
    s = sigma[0] + torch.rand(b, device=x.device) * (sigma[1] - sigma[0])
    t = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, size)
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (size // 2, size // 2, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, size // 2, size // 2), mode="reflect"), k[:, None, :, None], groups=b * c)
    on = torch.rand(b, 1, 1, 1, device=x.device) < p
    return torch.where(on, flat.reshape(b, c, h, w).clamp_(0, 1), x)


def simclr_view(x: torch.Tensor) -> torch.Tensor:
    """SimCLR's augmentations at full strength, for learning a representation: crop (0.08..1 of the area) + flip,
    colour jitter (0.4) with hue (0.1) at p 0.8, grayscale at p 0.2, blur where the size allows."""
    x = random_resized_crop(x, scale=(0.08, 1.0))
    return gaussian_blur(random_grayscale(hue_jitter(color_jitter(x, 0.4, 0.8), 0.1, 0.8)))


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
