"""Registration backbones and the REM cascade of ReFDRN / ReVoxelMorph (Sun & Simon, papers/000, section III-B).

Everything here takes a moving/fixed pair stacked as two channels ``[B, 2, D, H, W]`` and returns a dense
displacement field (DDF) ``[B, 3, D, H, W]`` in voxel units of the input grid, ordered like the spatial axes
(D, H, W), i.e. exactly what ``monai.networks.blocks.Warp`` expects: ``warped(x) = moving(x + ddf(x))``.

FDRN
----
FDRN (Sun & Simon, "FDRN: a fast deformable registration network for medical images", Med. Phys. 48(10), 2021)
has no public code. Its abstract states: a compact encoder-decoder; *additive* forwarding instead of channel
concatenation for the encoder-decoder skips; each encoder and decoder stage is deepened, with skip connections
inside the stages for residual learning; an auxiliary loss on a DVF predicted at the bottom (lowest-resolution)
layer, weighted by an exponentially decaying factor (coarse-to-fine supervision). :class:`FDRN` builds exactly
that; every other detail is our choice, listed here so that it can go into the model card:

- **Levels / widths.** ``channels = (c0, c1, ..., cL)``; ``c0`` is the full-resolution width and ``L =
  len(channels) - 1`` is the number of 2x downsamplings (default ``(16, 32, 32, 32, 32)``: 4 levels, coarsest
  grid 1/16, like VoxelMorph VM-2; the LPBA40 crop 160x208x176 is a multiple of 16).
- **Stem.** One 3x3x3 conv ``2 -> c0`` + activation at full resolution. No residual convs at full resolution
  (memory: a full 160x208x176 volume with batch 1 is trained in one piece, as in the paper).
- **Encoder stage l = 1..L.** Downsampling by a stride-2 3x3x3 conv ``c(l-1) -> cl`` + activation (learned
  downsampling rather than max-pooling), then ``num_res`` residual convs ``h = h + act(conv3x3x3(h))`` (one conv
  per residual unit, the same unit as REM Variant III of the same authors; the identity path stays linear).
- **Bottom / auxiliary head.** A 3x3x3 conv ``cL -> 3`` on the coarsest features gives the auxiliary DVF. It is a
  side output only (it is not fed back into the decoder), used by the decaying auxiliary loss. It is returned on
  the coarse grid and **in coarse-grid voxel units** (so ``Warp`` can use it directly on images average-pooled to
  that grid), cropped to ``ceil(size / 2**L)`` cells per axis when the input was padded.
- **Decoder stage l = L-1..0.** Trilinear 2x upsampling (``align_corners=False``, no checkerboard artefacts),
  a 3x3x3 conv ``c(l+1) -> cl`` + activation, **addition** of the encoder feature map of the same level (the
  additive skip; it needs equal widths, which the shared ``channels`` tuple guarantees), then ``num_res``
  residual convs for ``l >= 1``; at full resolution (``l = 0``) one plain conv ``c0 -> c0`` + activation instead.
- **Flow head.** A 3x3x3 conv ``c0 -> 3``; weights drawn from N(0, ``init_std``) (default 1e-5, as VoxelMorph) and
  zero bias, so the initial field is ~identity (``init_std=0`` gives an exactly zero field; then the first
  optimiser step only moves the heads). The aux head uses the same initialisation.
- **Activation / normalisation.** LeakyReLU(0.2) (VoxelMorph's slope); no normalisation layers (batch size 1).
- **Padding.** Inputs whose size is not a multiple of ``2**L`` are zero-padded at the *end* of each axis (so the
  origin and the coarse cells stay aligned with the input grid) and the DDF is cropped back.
- **Outputs.** ``forward(x)`` returns the DDF; with ``return_aux=True`` (constructor flag, or the ``return_aux``
  keyword of ``forward`` which overrides it) it returns ``(ddf, aux_ddf)``.
- The segmentation-prior loss of FDRN is not used (ReFDRN is unsupervised).

Default configuration: 592,998 parameters (``count_parameters(FDRN())``).

VoxelMorph VM-2
---------------
:func:`voxelmorph_vm2` configures MONAI's ``VoxelMorphUNet`` with the original VM-2 widths (encoder 16, 32, 32,
32; decoder 32, 32, 32, 32, 32, 16, 16; then the 16 -> 3 flow conv). In MONAI's pairwise ``channels`` notation this
is ``channels=(16, 32, 32, 32, 32, 32, 32, 32)``, ``unet_out_channels=32``, ``final_conv_channels=(16, 16)``:
4 max-poolings (coarsest 1/16), concatenating skips, nearest upsampling, LeakyReLU(0.2), and MONAI's
``final_conv_out`` is the 3-channel flow conv. 327,331 parameters, identical to the reference ``voxelmorph``
implementation with ``[[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]``. The flow conv is re-initialised to
N(0, 1e-5) with zero bias as in VoxelMorph; inputs are padded to a multiple of 16 and cropped back.

Cascade
-------
:class:`RegistrationCascade` is eq. (2) of the paper: ``y = REM(x)`` applied to the moving and fixed images
separately (stacked along the batch axis), the pair of SR images stacked as channels, then ``z = backbone(y~)``.
REM is frozen (``requires_grad=False``) and kept in eval mode, but it is *not* run under ``torch.no_grad()``:
gradients still flow through it (needed by the auxiliary loss ``Huber(REM(phi o M_LR), REM(F_LR))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FDRN",
    "PaddedBackbone",
    "RegistrationCascade",
    "ResidualConv",
    "count_parameters",
    "pad_to_multiple",
    "voxelmorph_vm2",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``x`` ([B, C, *spatial]) at their end up to a multiple of ``multiple``.

    Returns the padded tensor and the original spatial shape (to crop back with ``x[..., :d, :h, :w]``).
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    extra = [(-s) % multiple for s in spatial]
    if any(extra):
        pad: list[int] = []
        for e in reversed(extra):  # F.pad takes the last axis first
            pad += [0, e]
        x = F.pad(x, pad, mode="constant", value=0.0)
    return x, spatial


def _crop(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    return x[(...,) + tuple(slice(0, int(s)) for s in spatial)]


def _init_flow_conv(conv: nn.Conv3d, std: float) -> None:
    if std > 0:
        nn.init.normal_(conv.weight, mean=0.0, std=std)
    else:
        nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResidualConv(nn.Module):
    """``h + act(conv3x3x3(h))``: one residual unit of an FDRN stage (width preserved)."""

    def __init__(self, channels: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


def _conv_act(cin: int, cout: int, negative_slope: float, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1), nn.LeakyReLU(negative_slope))


class FDRN(nn.Module):
    """Compact encoder-decoder with additive skips, residual stages and a coarse auxiliary DVF head.

    See the module docstring for every design choice.

    Args:
        in_channels: channels of the stacked input pair (2: moving, fixed).
        channels: widths per resolution level, full resolution first; ``len(channels) - 1`` downsamplings.
        num_res: residual convs per encoder stage (levels >= 1) and per decoder stage (levels >= 1).
        negative_slope: LeakyReLU slope.
        init_std: std of the normal init of the flow and aux heads (0 -> exactly zero initial field).
        return_aux: default for ``forward(..., return_aux=None)``; when true, ``forward`` returns
            ``(ddf, aux_ddf)`` with ``aux_ddf`` the coarse DVF in coarse-grid voxel units.
    """

    def __init__(
        self,
        in_channels: int = 2,
        channels: Sequence[int] = (16, 32, 32, 32, 32),
        num_res: int = 2,
        negative_slope: float = 0.2,
        init_std: float = 1e-5,
        return_aux: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"FDRN needs at least two levels in `channels`, got {channels}")
        if num_res < 0 or min(channels) < 1:
            raise ValueError(f"FDRN needs num_res >= 0 and positive widths, got num_res={num_res}, {channels}")
        self.in_channels = int(in_channels)
        self.channels = channels
        self.levels = len(channels) - 1
        self.num_res = int(num_res)
        self.return_aux = bool(return_aux)

        ns = negative_slope
        self.stem = _conv_act(self.in_channels, channels[0], ns)
        self.down = nn.ModuleList(_conv_act(channels[i - 1], channels[i], ns, stride=2) for i in range(1, self.levels + 1))
        self.enc_res = nn.ModuleList(
            nn.Sequential(*(ResidualConv(channels[i], ns) for _ in range(self.num_res))) for i in range(1, self.levels + 1)
        )
        self.aux_head = nn.Conv3d(channels[-1], 3, kernel_size=3, padding=1)
        # decoder, indexed by target level l = L-1 .. 0 (stored in that order)
        self.up = nn.ModuleList(_conv_act(channels[l + 1], channels[l], ns) for l in reversed(range(self.levels)))
        self.dec_res = nn.ModuleList(
            nn.Sequential(*(ResidualConv(channels[l], ns) for _ in range(self.num_res))) if l > 0
            else _conv_act(channels[0], channels[0], ns)
            for l in reversed(range(self.levels))
        )
        self.flow = nn.Conv3d(channels[0], 3, kernel_size=3, padding=1)
        _init_flow_conv(self.flow, init_std)
        _init_flow_conv(self.aux_head, init_std)

    @property
    def size_multiple(self) -> int:
        return 2 ** self.levels

    def forward(self, x: torch.Tensor, return_aux: bool | None = None):
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"FDRN expects [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        want_aux = self.return_aux if return_aux is None else bool(return_aux)
        x, spatial = pad_to_multiple(x, self.size_multiple)

        h = self.stem(x)
        skips = [h]
        for down, res in zip(self.down, self.enc_res):
            h = res(down(h))
            skips.append(h)
        aux = self.aux_head(h) if want_aux else None
        for i, (up, refine) in enumerate(zip(self.up, self.dec_res)):
            skip = skips[self.levels - 1 - i]
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = refine(up(h) + skip)
        ddf = _crop(self.flow(h), spatial)
        if not want_aux:
            return ddf
        coarse = [-(-s // self.size_multiple) for s in spatial]  # ceil: coarse cells touching real voxels
        return ddf, _crop(aux, coarse)


class PaddedBackbone(nn.Module):
    """Wrap a fully convolutional backbone: zero-pad the input to a multiple of ``multiple``, crop the output."""

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = int(multiple)

    @property
    def size_multiple(self) -> int:
        return self.multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, spatial = pad_to_multiple(x, self.multiple)
        return _crop(self.net(x), spatial)


def voxelmorph_vm2(in_channels: int = 2, init_std: float = 1e-5, pad_multiple: int = 16) -> PaddedBackbone:
    """VoxelMorph VM-2 backbone (327,331 parameters) built from MONAI's ``VoxelMorphUNet``; returns a DDF.

    The returned module maps ``[B, in_channels, D, H, W]`` to a DDF ``[B, 3, D, H, W]`` (voxel units); inputs are
    zero-padded at the end of each axis to a multiple of ``pad_multiple`` (16 = 2**4 poolings) and cropped back.
    No integration (the non-diffeomorphic VM-2 of the paper's comparison).
    """
    from monai.networks.nets import VoxelMorphUNet

    unet = VoxelMorphUNet(
        spatial_dims=3,
        in_channels=in_channels,
        unet_out_channels=32,
        channels=(16, 32, 32, 32, 32, 32, 32, 32),
        final_conv_channels=(16, 16),
    )
    _init_flow_conv(unet.net[1].final_conv_out.conv, init_std)
    return PaddedBackbone(unet, pad_multiple)


class RegistrationCascade(nn.Module):
    """REM -> registration backbone (ReFDRN / ReVoxelMorph, eq. (2) of the paper).

    Args:
        backbone: maps ``[B, 2, D, H, W]`` to a DDF ``[B, 3, D, H, W]``, or to ``(ddf, aux_ddf)``.
        rem: the (pretrained) resolution enhancement module mapping ``[N, 1, D, H, W]`` to the same shape, or
            ``None`` for the identity (the plain backbone on the trilinear-upsampled input, the paper's "↓↑"
            baseline). It is frozen and kept in eval mode, whatever ``train()`` says.

    REM is deliberately *not* a registered submodule: ``state_dict()``, ``parameters()`` and DDP see only the
    backbone, so checkpoints never copy the ``rem_sr`` weights (they are loaded from that bundle). ``.to()``
    and friends still move it (``_apply``).

    ``forward(x)`` takes the pair stacked as channels ``[B, 2, D, H, W]`` (moving, fixed; trilinear-upsampled LR,
    the REM input grid) and returns the DDF, the bundle's ``network_def`` contract. ``register(moving, fixed)``
    returns ``{"ddf", "sr_moving", "sr_fixed"}`` plus ``"aux_ddf"`` when the backbone gives one; with
    ``sr_moving``/``sr_fixed`` given (precomputed REM outputs), REM is not run again. Gradients flow through REM
    (no ``torch.no_grad``); only its parameters receive none.
    """

    def __init__(self, backbone: nn.Module, rem: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self._rem = (rem,)  # a tuple hides the module from nn.Module's registry
        if rem is not None:
            rem.requires_grad_(False)
            rem.eval()

    @property
    def rem(self) -> nn.Module | None:
        return self._rem[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.rem is not None:
            self.rem._apply(fn)
        return self

    def train(self, mode: bool = True) -> RegistrationCascade:
        super().train(mode)
        if self.rem is not None:
            self.rem.eval()
        return self

    def trainable_parameters(self):
        """The parameters an optimiser should see (the backbone's)."""
        return (p for p in self.parameters() if p.requires_grad)

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """REM(x) (identity when there is no REM)."""
        return x if self.rem is None else self.rem(x)

    def register(self, moving: torch.Tensor, fixed: torch.Tensor, sr_moving: torch.Tensor | None = None,
                 sr_fixed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape")
        if moving.ndim != 5:
            raise ValueError(f"expected [B, C, D, H, W] images, got {tuple(moving.shape)}")
        if sr_moving is None or sr_fixed is None:
            b = moving.shape[0]
            sr = self.enhance(torch.cat([moving, fixed], dim=0))  # each image on its own (batch axis)
            sr_moving, sr_fixed = sr[:b], sr[b:]
        out = self.backbone(torch.cat([sr_moving, sr_fixed], dim=1))  # the pair as channels
        result = {"sr_moving": sr_moving, "sr_fixed": sr_fixed}
        if isinstance(out, (tuple, list)):
            result["ddf"] = out[0]
            if len(out) > 1 and out[1] is not None:
                result["aux_ddf"] = out[1]
        else:
            result["ddf"] = out
        return result

    def forward(self, x: torch.Tensor, precomputed_sr: bool = False, return_dict: bool = False):
        """DDF of the pair ``x = [moving, fixed]``. ``precomputed_sr=True``: `x` already holds REM's outputs
        (training with cached SR volumes). ``return_dict=True``: the full `register` dict (goes through DDP)."""
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"expected the pair as [B, 2, D, H, W] (moving, fixed), got {tuple(x.shape)}")
        moving, fixed = x[:, :1], x[:, 1:]
        out = self.register(moving, fixed, *((moving, fixed) if precomputed_sr else (None, None)))
        return out if return_dict else out["ddf"]


def build_registration_network(backbone: str = "fdrn", rem: nn.Module | None = None,
                               fdrn_channels: Sequence[int] = (16, 32, 32, 32, 32), fdrn_num_res: int = 2,
                               return_aux: bool = True) -> RegistrationCascade:
    """The bundle's `network_def`: REM (or identity) followed by FDRN or VoxelMorph VM-2."""
    name = str(backbone).lower()
    if name == "fdrn":
        net = FDRN(channels=tuple(fdrn_channels), num_res=fdrn_num_res, return_aux=return_aux)
    elif name in ("voxelmorph", "vm2"):
        net = voxelmorph_vm2()
    else:
        raise ValueError(f"unknown backbone {backbone!r}; use 'fdrn' or 'voxelmorph'")
    return RegistrationCascade(net, rem)
