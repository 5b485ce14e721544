"""REM: the resolution enhancement module of Sun & Simon (papers/000, section III-A, Fig. 1).

REM takes a trilinear-upsampled low-resolution volume and returns a volume of the same size:
3x3x3 conv (1->k) + ReLU, n x [3x3x3 conv (k->k) + ReLU], 3x3x3 conv (k->1), bias everywhere.
The three variants differ only in where the residual connections are:

- ``"I"``: global image-domain skip, ``out = x + f(x)`` (the paper's best; the default).
- ``"II"``: feature-domain skip, the first feature map is added to the last one before the output conv.
- ``"III"``: a skip around every intermediate conv, ``h = h + relu(conv(h))``.

Skips add no parameters, so every variant has the paper's counts (k16n8: 56,305).
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("I", "II", "III")


class REM(nn.Module):
    def __init__(self, k: int = 16, n: int = 8, variant: str = "I", in_channels: int = 1) -> None:
        super().__init__()
        variant = str(variant).upper()
        if variant not in VARIANTS:
            raise ValueError(f"REM variant must be one of {VARIANTS}, got {variant!r}")
        if k < 1 or n < 0:
            raise ValueError(f"REM needs k >= 1 and n >= 0, got k={k}, n={n}")
        self.k, self.n, self.variant = k, n, variant
        self.head = nn.Conv3d(in_channels, k, kernel_size=3, padding=1)
        self.body = nn.ModuleList(nn.Conv3d(k, k, kernel_size=3, padding=1) for _ in range(n))
        self.tail = nn.Conv3d(k, in_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.act(self.head(x))
        h = first
        for conv in self.body:
            if self.variant == "III":
                h = h + self.act(conv(h))
            else:
                h = self.act(conv(h))
        if self.variant == "II":
            h = h + first
        out = self.tail(h)
        if self.variant == "I":
            out = out + x
        return out

    @property
    def receptive_radius(self) -> int:
        """Voxels of context each output voxel sees on each side (one per 3x3x3 conv)."""
        return self.n + 2
