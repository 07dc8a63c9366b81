"""Encoders and decoders. Images arrive as float (B, C, H, W) in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Autoencoder(nn.Module):
    """Subclasses set self.encoder (image -> code) and self.decoder (code -> image)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, D)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.decode(z)


class ConvAutoencoder(Autoencoder):
    """Seed 001's MNIST autoencoder, generalised to any side divisible by 4.

    Authors: conv 50@5x5+BN+ReLU, pool; conv 50@5x5+BN+ReLU, pool; conv 120@4x4 -> code; mirrored decoder.
    Our choice: 'same' padding and a linear layer to the code, so one net serves 8x8 digits, 28x28 MNIST
    and 32x32 CIFAR; widths and code size are config fields.
    """

    def __init__(self, channels: int, side: int, code_dim: int = 10, widths: tuple[int, int] = (32, 64)):
        super().__init__()
        if side % 4:
            raise ValueError(f"ConvAutoencoder needs an image side divisible by 4, got {side}")
        w1, w2 = widths
        self.grid = (w2, side // 4, side // 4)
        flat = w2 * (side // 4) ** 2
        self.encoder = nn.Sequential(conv_block(channels, w1), conv_block(w1, w2), nn.Flatten(), nn.Linear(flat, code_dim))
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, flat), nn.ReLU(inplace=True), nn.Unflatten(1, self.grid),
            up_block(w2, w1), nn.ConvTranspose2d(w1, channels, 4, stride=2, padding=1),
        )


class MLPAutoencoder(Autoencoder):
    """DEC's fully connected autoencoder d-500-500-2000-code with a mirrored decoder (Xie et al. 2016)."""

    def __init__(self, channels: int, side: int, code_dim: int = 10, widths: tuple[int, ...] = (500, 500, 2000)):
        super().__init__()
        self.shape = (channels, side, side)
        dims = [channels * side * side, *widths]
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims, dims[1:]):
            enc += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc, nn.Linear(dims[-1], code_dim))
        rev = dims[::-1]
        dec: list[nn.Module] = [nn.Linear(code_dim, rev[0]), nn.ReLU(inplace=True)]
        for a, b in zip(rev, rev[1:-1]):
            dec += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*dec, nn.Linear(rev[-2], rev[-1]), nn.Unflatten(1, self.shape))


class ConvNet(nn.Module):
    """Conv trunk for small grayscale images -> `out_dim` outputs (the K mixture components, for NMM)."""

    def __init__(self, channels: int, side: int, out_dim: int, widths: tuple[int, int] = (32, 64), hidden: int = 256):
        super().__init__()
        if side % 4:
            raise ValueError(f"ConvNet needs an image side divisible by 4, got {side}")
        w1, w2 = widths
        self.net = nn.Sequential(
            conv_block(channels, w1), conv_block(w1, w2), nn.Flatten(),
            nn.Linear(w2 * (side // 4) ** 2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, out_dim)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as used for 32x32 images."""

    def __init__(self, channels: int, out_dim: int, width: int = 64):
        super().__init__()
        layers, c = [], width
        for i, (c_out, stride) in enumerate([(width, 1), (width * 2, 2), (width * 4, 2), (width * 8, 2)]):
            layers += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, out_dim)
