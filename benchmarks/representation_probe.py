"""Representation probe: how often an image's nearest neighbours share its class in NMM's features after its
representation stage alone (SimCLR's instance loss), with SimCLR's views at full strength (the stage as built) and
with the milder views NMM's clustering uses; beside the same figure in pixels.

    python benchmarks/representation_probe.py --data CIFAR_DIR/train --sample 2000 --epochs 20

Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import time

import torch
from quality import learnt_features, pixel_purity, representation_purity
from runner import device, finish, load_arrays, parser

from clustering import engine
from clustering.config import TrainConfig
from clustering.model.augment import rgb_view
from clustering.model.methods import NMM


def probe(images, labels, epochs: int, strength: str) -> dict:
    cfg = TrainConfig.of(method="nmm", k=10, encoder="conv", batch_size=256, contrast_epochs=epochs, joint_epochs=1)
    torch.manual_seed(0)
    method_init = NMM.__init__
    if strength == "mild":  # the views NMM's clustering compares, in place of SimCLR's
        def init(self, *args, **kwargs):
            method_init(self, *args, **kwargs)
            self.scan.strong_view = rgb_view
        NMM.__init__ = init
    try:
        t0 = time.perf_counter()
        model = engine.fit(images, cfg, device=device(), log=lambda s: None)
    finally:
        NMM.__init__ = method_init
    x = engine.device_images(images, device())
    purity = representation_purity(learnt_features(cfg, model, x), labels)
    return {"views": strength, "epochs": epochs, "purity": round(purity, 4),
            "pixel_purity": round(pixel_purity(x, labels), 4), "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    p = parser(__doc__, "results/representation-probe.json", data=None)
    p.add_argument("--sample", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    images, labels = load_arrays(args.data, sample=args.sample)
    rows = [probe(images, labels, args.epochs, strength) for strength in ("full", "mild")]
    finish(args.out, {"data": args.data, "n": len(images), "rows": rows}, (rows, None))


if __name__ == "__main__":
    main()
