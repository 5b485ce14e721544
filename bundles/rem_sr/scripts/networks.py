"""REM: the resolution enhancement module.

Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-A ("Resolution Enhancement Module"), Fig. 1 and Table I.

REM takes a trilinear-upsampled low-resolution volume and returns a volume of the same size:
3x3x3 conv (1->k) + ReLU, n x [3x3x3 conv (k->k) + ReLU], 3x3x3 conv (k->1), bias everywhere.
The three variants of Fig. 1 differ only in where the residual connections are:

- ``"I"``: global image-domain skip, ``out = x + f(x)`` (the best variant in Table I; the default).
- ``"II"``: feature-domain skip, the first feature map is added to the last one before the output conv.
- ``"III"``: a skip around every intermediate conv, ``h = h + relu(conv(h))``.

Skips add no parameters, so every variant has the paper's counts (k16n8: 56,305; Table I gives 56.3K).
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("I", "II", "III")


class REM(nn.Module):
    """
    Resolution enhancement module: a plain 3D residual CNN that restores detail in a trilinear-upsampled volume.

    The input is a low-resolution image already interpolated (trilinearly) onto the high-resolution grid, so the
    network has no built-in upscaling factor and the output has exactly the input's shape; it can therefore be
    placed in front of any network (e.g. a registration backbone) as a plug-in. All convolutions are 3x3x3 with
    zero padding 1 and bias, followed by ReLU except the last one.

    Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section III-A and Fig. 1 (variants I-III); Section IV-C and Table II (the k16n8 configuration).

    Args:
        k: number of filters of every intermediate convolution (the paper's ``k``; 16 in the paper).
        n: number of intermediate k->k convolutions (the paper's ``n``; 8 in the paper).
        variant: residual scheme, one of ``"I"`` (image-domain skip ``x + f(x)``), ``"II"`` (feature-domain skip
            from the first to the last feature map) or ``"III"`` (a skip around every intermediate convolution);
            case-insensitive.
        in_channels: number of image channels, equal to the number of output channels (1 for a single MRI).

    Raises:
        ValueError: when ``variant`` is not one of ``VARIANTS``, or when ``k < 1`` or ``n < 0``.

    Example::

        import torch
        from scripts.networks import REM

        rem = REM(k=16, n=8, variant="I")          # 56,305 parameters
        lr_up = torch.rand(1, 1, 32, 40, 32)       # LR volume, trilinearly upsampled to the HR grid
        sr = rem(lr_up)                            # same shape, [1, 1, 32, 40, 32]
        assert sr.shape == lr_up.shape
        assert rem.receptive_radius == 10          # voxels of context on each side
    """

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
        # in place: no new feature map per layer (about 25% faster on the CPU, the same numbers)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Enhance a trilinear-upsampled low-resolution volume.

        Args:
            x: the upsampled low-resolution image, in shape [B, in_channels, D, H, W] (any spatial size; the
                intensity scale REM was trained on is the one of the ``rem_sr`` bundle: 99.5th percentile of the
                non-zero voxels = 1).

        Returns:
            the super-resolved image, in the same shape and on the same grid as ``x`` [B, in_channels, D, H, W].
        """
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
        """
        Receptive-field radius of one output voxel, in voxels.

        Returns:
            ``n + 2``: the voxels of context each output voxel sees on each side along each axis (one per 3x3x3
            convolution); useful to choose the overlap of sliding-window inference.
        """
        return self.n + 2
