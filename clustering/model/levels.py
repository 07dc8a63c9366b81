"""How pixels become the model's input, and whether a corpus' colour is content or only a cast.

The same content, however it was captured, should look alike to the model: a dimmer capture, a scan with a yellow
cast or a tinted print of a gray image carry the same content as the clean image. So each channel of each image is
stretched until its brightest pixel is white (the white-patch rule of colour constancy), at most `MAX_GAIN` times,
so a near-black channel is not blown up into noise. On images whose brightest pixel is already white (most clean
collections) this changes nothing.

After that stretch a tinted gray image is gray again. `colourful` asks whether a corpus' colour images carry
colour of their own (photographs) or only casts (tinted scans and prints): the methods then pick their views by
what the content is, not by how it was stored.
"""
from __future__ import annotations

import torch

from ..comm import Comm

MAX_GAIN = 4.0  # a channel is stretched at most this much: a channel this dark holds noise, not content
# Mean |channel − gray| per pixel, after the stretch, under which a corpus' colour is a cast: tinted digits 0.007,
# CIFAR-10 0.044 (docs/results/HISTORY.md)
COLOUR_CAST = 0.02
POLICY = "each channel of each image stretched until its brightest pixel is white (at most 4x)"


def stretch(x: torch.Tensor) -> torch.Tensor:
    """Float images (B, C, H, W) in 0..1, each channel scaled so its brightest pixel is 1 (gain at most MAX_GAIN)."""
    return x.div_(x.amax((2, 3), keepdim=True).clamp_min(1.0 / MAX_GAIN)).clamp_(0, 1)


def pixels_to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, C, H, W) as the model's input: floats in 0..1, levels stretched."""
    return stretch(x.float().div_(255.0))


@torch.no_grad()
def colourful(images: torch.Tensor, comm: Comm = Comm(), batch: int = 4096) -> bool:
    """Whether uint8 images (N, C, H, W), over every rank's, carry colour beyond a cast: their mean |channel −
    gray| after the stretch reaches COLOUR_CAST. Gray images (C = 1) never do; features (not pixels) are not
    asked: True. Every rank gets the same answer."""
    if images.dtype != torch.uint8:
        return True
    if images.shape[1] == 1:
        return False
    total = torch.zeros(2, dtype=torch.float64, device=images.device)  # (Σ chroma, pixels)
    for i in range(0, len(images), batch):
        x = pixels_to_input(images[i:i + batch])
        total[0] += (x - x.mean(1, keepdim=True)).abs().mean(1).sum().double()
        total[1] += x.shape[0] * x.shape[2] * x.shape[3]
    total = comm.sum(total)
    return bool(total[0] / total[1].clamp_min(1) >= COLOUR_CAST)
