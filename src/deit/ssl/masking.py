"""BEiT's blockwise masking: rectangles of patches, masked until about 40 % of the grid is covered.

For each image, drawn from its own seed (so resume and several processes stay
exact): a block of ``area`` patches, at least ``min_block``, at most what is
left to mask, with an aspect ratio between 0.3 and 1/0.3 (log-uniform), at a
uniform position on the grid. Patches already masked do not count twice, and a
block that would overshoot the target is redrawn (up to 10 tries). This
repeats until the target count is reached, or until no try adds a patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockMasks:
    grid: int  # patches per side
    ratio: float = 0.4
    min_block: int = 4  # BEiT: 16 of 196 patches; at least one patch on a small grid
    aspect: tuple[float, float] = (0.3, 1 / 0.3)

    @property
    def target(self) -> int:
        return max(1, round(self.ratio * self.grid * self.grid))

    def __call__(self, seeds: torch.Tensor) -> torch.Tensor:
        """(B,) int64 seeds on the host -> (B, grid * grid) bool masks, row by row, True where masked."""
        return torch.stack([self.one(int(seed)) for seed in seeds.tolist()]).flatten(1)

    def one(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        mask = torch.zeros(self.grid, self.grid, dtype=torch.bool)
        masked = 0
        while masked < self.target:
            added = self._block(mask, self.target - masked, generator)
            if added == 0:
                break
            masked += added
        return mask

    def _block(self, mask: torch.Tensor, room: int, generator: torch.Generator) -> int:
        """Mask one more block (in place) of at most ``room`` new patches; returns how many it added."""
        low = min(self.min_block, room)
        log_low, log_high = math.log(self.aspect[0]), math.log(self.aspect[1])
        for _ in range(10):
            area, aspect_draw, top_draw, left_draw = torch.rand(4, generator=generator).tolist()
            area = low + (room - low) * area
            aspect = math.exp(log_low + (log_high - log_low) * aspect_draw)
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if not (1 <= height <= self.grid and 1 <= width <= self.grid):
                continue
            top = int(top_draw * (self.grid - height + 1))
            left = int(left_draw * (self.grid - width + 1))
            block = mask[top : top + height, left : left + width]
            added = int((~block).sum())
            if 0 < added <= room:
                block.fill_(True)
                return added
        return 0
