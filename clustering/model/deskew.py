"""Handwriting's slant, taken out of the label-free neighbour graph (`train.deskew`).

In pixels a slanted character is far from the same character written upright, and nearer a frequent look-alike
written at its slant: on MNIST at class frequencies 1x..5x the rare 4s link to the 9s. Shearing each image until
its strokes stand upright (its second moments: the classic deskew of handwriting) and moving its centre of mass to
the middle makes slant and position no longer a distance. Only the graph reads these pixels; the model's input is
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def deskew(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W), uint8 or floats, each sheared along its rows by the slant of its mass (the channels'
    mean) and centred on it, bilinearly (what falls outside is black). The same dtype back; a blank image stays."""
    img = x.float()
    _, _, h, w = img.shape
    mass = img.mean(1, keepdim=True)
    total = mass.sum((2, 3), keepdim=True).clamp_min(1e-6)
    rows = torch.arange(h, dtype=img.dtype, device=img.device).view(1, 1, h, 1)
    cols = torch.arange(w, dtype=img.dtype, device=img.device).view(1, 1, 1, w)
    cy, cx = (mass * rows).sum((2, 3), keepdim=True) / total, (mass * cols).sum((2, 3), keepdim=True) / total
    var_y = (mass * (rows - cy) ** 2).sum((2, 3), keepdim=True)
    slant = (mass * (rows - cy) * (cols - cx)).sum((2, 3), keepdim=True) / var_y.clamp_min(1e-6)  # cov / var
    # the output pixel (r, c) reads the input at row cy + dr and column cx + dc + slant * dr, d* from the middle
    dr, dc = rows - (h - 1) / 2, cols - (w - 1) / 2
    y_in, x_in = cy + dr, cx + dc + slant * dr
    grid = torch.stack(torch.broadcast_tensors(x_in * 2 / max(w - 1, 1) - 1, y_in * 2 / max(h - 1, 1) - 1), -1)
    out = F.grid_sample(img, grid[:, 0], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else out.to(x.dtype)
