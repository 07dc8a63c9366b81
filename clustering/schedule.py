"""Stages and per-step schedules as pure functions of the epoch / step."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    start: int  # first epoch of the stage
    epochs: int

    @property
    def end(self) -> int:
        return self.start + self.epochs


def make_stages(**epochs: int) -> list[Stage]:
    """make_stages(pretrain=50, joint=30) -> consecutive stages; empty ones dropped."""
    out, start = [], 0
    for name, n in epochs.items():
        if n > 0:
            out.append(Stage(name, start, n))
            start += n
    return out


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    return next(s for s in stages if s.start <= epoch < s.end)


def steps_per_epoch(global_samples: int, global_batch: int) -> int:
    """Every rank runs this many steps, whatever its share of the data: no rank waits on a collective."""
    return max(1, math.ceil(global_samples / global_batch))

