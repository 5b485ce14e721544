"""Registration backbones and the REM cascade of ReFDRN / ReVoxelMorph.

Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-B ("Cascaded Network"), Fig. 2 and Eq. (2).

Naming: the papers call the registration output a "displacement vector field (DVF)". Here it is a *DDF* (dense
displacement field), as in MONAI, where "DVF" is reserved for a (stationary) velocity field to be integrated by
``monai.networks.blocks.DVF2DDF``. Nothing in this module predicts a velocity field.

Everything here takes a moving/fixed pair stacked as two channels ``[B, 2, D, H, W]`` and returns a dense
displacement field (DDF) ``[B, 3, D, H, W]`` in voxel units of the input grid, ordered like the spatial axes
(D, H, W), i.e. exactly what ``monai.networks.blocks.Warp`` expects: ``warped(x) = moving(x + ddf(x))``.

FDRN
----
FDRN (Sun & Simon, "FDRN: a fast deformable registration network for medical images", Med. Phys. 48(10), 2021)
has no public code. Its abstract states: a compact encoder-decoder; *additive* forwarding instead of channel
concatenation for the encoder-decoder skips; each encoder and decoder stage is deepened, with skip connections
inside the stages for residual learning; an auxiliary loss on a DDF predicted at the bottom (lowest-resolution)
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
- **Bottom / auxiliary head.** A 3x3x3 conv ``cL -> 3`` on the coarsest features gives the auxiliary DDF. It is a
  side output only (it is not fed back into the decoder), used by the decaying auxiliary loss. It is returned on
  the coarse grid and **in coarse-grid voxel units** (so ``Warp`` can use it directly on images average-pooled to
  that grid), cropped to ``ceil(size / 2**L)`` cells per axis when the input was padded.
- **Decoder stage l = L-1..0.** Trilinear 2x upsampling (``align_corners=False``, no checkerboard artefacts),
  a 3x3x3 conv ``c(l+1) -> cl`` + activation, **addition** of the encoder feature map of the same level (the
  additive skip; it needs equal widths, which the shared ``channels`` tuple guarantees), then ``num_res``
  residual convs for ``l >= 1``; at full resolution (``l = 0``) one plain conv ``c0 -> c0`` + activation instead.
- **Flow head.** A 3x3x3 conv ``c0 -> 3`` (the DDF conv); weights drawn from N(0, ``init_std``) (default 1e-5,
  as VoxelMorph) and zero bias, so the initial field is ~identity (``init_std=0`` gives an exactly zero field;
  then the first optimiser step only moves the heads). The aux head uses the same initialisation.
- **Activation / normalisation.** LeakyReLU(0.2) (VoxelMorph's slope); no normalisation layers (batch size 1).
- **Padding.** Inputs whose size is not a multiple of ``2**L`` are zero-padded at the *end* of each axis (so the
  origin and the coarse cells stay aligned with the input grid) and the DDF is cropped back.
- **Outputs.** ``forward(x)`` returns the DDF; with ``return_aux=True`` (constructor flag, or the ``return_aux``
  keyword of ``forward`` which overrides it) it returns ``(ddf, aux_ddf)``.
- The segmentation-prior loss of FDRN is not used (ReFDRN is unsupervised).

Default configuration: 592,998 parameters (``count_parameters(FDRN())``).

VoxelMorph VM-2
---------------
G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag and A. V. Dalca, "VoxelMorph: A Learning Framework for Deformable
Medical Image Registration", IEEE TMI 38(8), 2019, the second registration network of the paper's Section IV-D.
:func:`voxelmorph_vm2` configures MONAI's ``VoxelMorphUNet`` with the original VM-2 widths (encoder 16, 32, 32,
32; decoder 32, 32, 32, 32, 32, 16, 16; then the 16 -> 3 flow conv). In MONAI's pairwise ``channels`` notation this
is ``channels=(16, 32, 32, 32, 32, 32, 32, 32)``, ``unet_out_channels=32``, ``final_conv_channels=(16, 16)``:
4 max-poolings (coarsest 1/16), concatenating skips, nearest upsampling, LeakyReLU(0.2), and MONAI's
``final_conv_out`` is the 3-channel flow conv. 327,331 parameters, identical to the reference ``voxelmorph``
implementation with ``[[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]``. The flow conv is re-initialised to
N(0, 1e-5) with zero bias as in VoxelMorph; inputs are padded to a multiple of 16 and cropped back.

Cascade
-------
:class:`RegistrationCascade` is Eq. (2) of the paper (Section III-B): ``y = REM(x)`` applied to the moving and fixed
images separately (stacked along the batch axis), the pair of SR images stacked as channels, then
``z = backbone(y~)``.
REM is frozen (``requires_grad=False``) and kept in eval mode, but it is *not* run under ``torch.no_grad()``:
gradients still flow through it (needed by the auxiliary loss ``Huber(REM(phi o M_LR), REM(F_LR))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import count_parameters  # noqa: F401  (re-exported: parameter counts in docs and tests)
from .fast_inference import exporting, float32_conv, halo_slabs

__all__ = [
    "FDRN",
    "PaddedBackbone",
    "RegistrationCascade",
    "ResidualConv",
    "count_parameters",
    "pad_to_multiple",
    "voxelmorph_vm2",
]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """
    Zero-pad the spatial axes of a batch at their end up to a multiple of ``multiple`` voxels.

    Padding only at the end keeps the origin (voxel 0) and the coarse cells of a ``multiple``-times downsampled grid
    aligned with the input grid.

    Args:
        x: a batch in shape [B, C, *spatial] (e.g. [B, C, D, H, W]).
        multiple: the size multiple in voxels (``2**levels`` of the backbone).

    Returns:
        the padded tensor [B, C, *padded_spatial] and the original spatial shape (to crop back with
        ``x[..., :d, :h, :w]``).
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
    """
    One residual unit of an FDRN stage: ``h + LeakyReLU(conv3x3x3(h))`` (width and size preserved).

    Source: the residual stages of FDRN (K. Sun and S. Simon, "FDRN: A fast deformable registration network for
    medical images", Med. Phys. 48(10), 2021; no public code, see the module docstring); the unit is the one of
    REM Variant III (Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section III-A, Fig. 1).

    Args:
        channels: number of input and output channels.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, channels: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)  # on the conv's fresh output: no extra feature map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: features in shape [B, channels, D, H, W].

        Returns:
            ``x + LeakyReLU(conv(x))``, same shape as ``x``.
        """
        return x + self.act(self.conv(x))


def _conv_act(cin: int, cout: int, negative_slope: float, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.LeakyReLU(negative_slope, inplace=True))


class FDRN(nn.Module):
    """
    FDRN registration backbone: a compact encoder-decoder with additive skips, residual stages and a coarse auxiliary
    DDF head, mapping a stacked moving/fixed pair to a dense displacement field (DDF) in voxels.

    Source: K. Sun and S. Simon, "FDRN: A fast deformable registration network for medical images", Med. Phys.
    48(10), pp. 6453-6463, 2021 (no public code: the architecture follows the paper's abstract and every other
    choice is listed in the module docstring); used as the registration network of ReFDRN in Sun & Simon, "A
    Resolution Enhancement Plug-in for Deformable Registration of Medical Images", Section III-B and Fig. 2.

    Args:
        in_channels: channels of the stacked input pair (2: moving, fixed).
        channels: widths per resolution level, full resolution first; ``len(channels) - 1`` downsamplings.
        num_res: residual convs per encoder stage (levels >= 1) and per decoder stage (levels >= 1).
        negative_slope: LeakyReLU slope.
        init_std: std of the normal init of the DDF and aux heads (0 -> exactly zero initial field).
        return_aux: default for ``forward(..., return_aux=None)``; when true, ``forward`` returns
            ``(ddf, aux_ddf)`` with ``aux_ddf`` the coarse DDF in coarse-grid voxel units.

    Raises:
        ValueError: when ``channels`` has fewer than two levels, a width is below 1 or ``num_res < 0``.

    Example::

        import torch
        from monai.networks.blocks import Warp
        from scripts.networks import FDRN

        net = FDRN(channels=(16, 32, 32, 32, 32), num_res=2)   # 592,998 parameters
        moving = torch.rand(1, 1, 40, 48, 40)
        fixed = torch.rand(1, 1, 40, 48, 40)
        pair = torch.cat([moving, fixed], dim=1)                # [1, 2, 40, 48, 40]
        ddf, aux_ddf = net(pair, return_aux=True)               # padded to 48x48x48 inside, cropped back
        assert ddf.shape == (1, 3, 40, 48, 40)                  # voxel units, channels along (D, H, W)
        assert aux_ddf.shape == (1, 3, 3, 3, 3)                 # ceil(size / 16), coarse-grid voxel units
        warped = Warp()(moving, ddf)                            # moving resampled onto the fixed grid
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
        self.down = nn.ModuleList(
            _conv_act(channels[i - 1], channels[i], ns, stride=2) for i in range(1, self.levels + 1)
        )
        self.enc_res = nn.ModuleList(
            nn.Sequential(*(ResidualConv(channels[i], ns) for _ in range(self.num_res)))
            for i in range(1, self.levels + 1)
        )
        self.aux_head = nn.Conv3d(channels[-1], 3, kernel_size=3, padding=1)
        # decoder, indexed by target level l = L-1 .. 0 (stored in that order)
        self.up = nn.ModuleList(_conv_act(channels[lv + 1], channels[lv], ns) for lv in reversed(range(self.levels)))
        self.dec_res = nn.ModuleList(
            nn.Sequential(*(ResidualConv(channels[lv], ns) for _ in range(self.num_res)))
            if lv > 0
            else _conv_act(channels[0], channels[0], ns)
            for lv in reversed(range(self.levels))
        )
        self.flow = nn.Conv3d(channels[0], 3, kernel_size=3, padding=1)
        _init_flow_conv(self.flow, init_std)
        _init_flow_conv(self.aux_head, init_std)

    #: inference (no gradients) computes the full-resolution decoder stage this many slices at a time
    inference_slab = 40

    @property
    def size_multiple(self) -> int:
        """
        Returns:
            ``2**levels``: inputs are zero-padded to a multiple of this size (voxels) inside :meth:`forward`.
        """
        return 2**self.levels

    def forward(self, x: torch.Tensor, return_aux: bool | None = None):
        """
        Predict the DDF that warps the moving image (channel 0) onto the fixed image (channel 1).

        Args:
            x: the moving and fixed images stacked as channels, in shape [B, in_channels, D, H, W] (any size: it is
                zero-padded at the end of each axis to a multiple of ``size_multiple`` and the outputs are cropped).
            return_aux: also return the auxiliary coarse DDF; ``None`` uses the constructor's ``return_aux``.

        Returns:
            the DDF [B, 3, D, H, W] in voxels of the input grid, channel ``i`` along spatial axis ``i`` (MONAI
            ``Warp`` convention); or, with ``return_aux``, the tuple ``(ddf, aux_ddf)`` where ``aux_ddf`` is
            [B, 3, ceil(D / 2**L), ceil(H / 2**L), ceil(W / 2**L)] in voxels of that coarse grid.

        Raises:
            ValueError: when ``x`` is not 5-dimensional or does not have ``in_channels`` channels.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"FDRN expects [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        want_aux = self.return_aux if return_aux is None else bool(return_aux)
        x, spatial = pad_to_multiple(x, self.size_multiple)

        h = self.stem(x)
        skips = [h]
        for down, res in zip(self.down, self.enc_res):
            h = res(down(h))
            skips.append(h)
        aux: torch.Tensor | None = None
        if want_aux:
            aux = self.aux_head(h) if torch.jit.is_scripting() else float32_conv(self.aux_head, h)
        skips.pop()  # the bottom map is h itself
        # inference (eager): the full-resolution stage slab by slab; training, TorchScript and export: whole
        if torch.jit.is_scripting():
            slabs = False
        else:
            slabs = not torch.is_grad_enabled() and not exporting() and x.shape[2] > self.inference_slab
        stages = self.levels - 1 if slabs else self.levels
        for up, refine in zip(self.up[:stages], self.dec_res[:stages]):
            skip = skips.pop()  # the encoder map of this level, released after the addition (memory)
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = up(h)  # one statement per step: each full-resolution map is freed as soon as it is used
            # without gradients the additive skip goes in place (with them, LeakyReLU's backward needs its output)
            h = h.add_(skip) if not torch.is_grad_enabled() else h + skip
            h = refine(h)
        if torch.jit.is_scripting():
            ddf = self.flow(h)
        elif slabs:
            ddf = self._full_resolution_in_slabs(h, skips.pop())
        else:
            ddf = float32_conv(self.flow, h)
        ddf = _crop(ddf, spatial)
        if not want_aux:
            return ddf
        coarse = [-(-s // self.size_multiple) for s in spatial]  # ceil: coarse cells touching real voxels
        return ddf, _crop(aux, coarse)

    def _full_resolution_in_slabs(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The last decoder stage and the DDF head, `inference_slab` slices along D at a time (inference only).

        The same computation as the loop in :meth:`forward` (2x trilinear upsampling, ``up`` conv, additive skip,
        ``refine`` conv, DDF conv), but no full-resolution map of the decoder is ever whole: each slab is computed
        with a halo of 3 slices (one per 3x3x3 convolution) from the half-resolution rows its upsampling needs, and
        cropped. The result equals the whole-volume one (to float rounding); the memory of the stage drops from
        about ``(2 * c1 + 2 * c0) x voxels`` values to one slab's.

        Args:
            h: the half-resolution decoder features [B, c1, D / 2, H / 2, W / 2].
            skip: the stem's features [B, c0, D, H, W] (the additive skip of level 0).

        Returns:
            the DDF [B, 3, D, H, W] in voxels, float32.
        """
        up, refine = self.up[-1], self.dec_res[-1]
        depth, half, halo = skip.shape[2], h.shape[2], 3
        parts = []
        for start, stop, low, high in halo_slabs(depth, self.inference_slab, halo):
            # half-resolution rows whose upsampling is exact on [low, high): one spare row on each side (the
            # interpolation clamps at a slab's edge as it does at the volume's only there)
            first, last = max((low - 1) // 2, 0), min((high + 2) // 2, half)
            rows = F.interpolate(
                h[:, :, first:last], size=(2 * (last - first), *skip.shape[3:]), mode="trilinear", align_corners=False
            )[:, :, low - 2 * first : high - 2 * first]
            y = up(rows)
            del rows
            y = refine(y.add_(skip[:, :, low:high]))
            parts.append(float32_conv(self.flow, y)[:, :, start - low : stop - low])
        return torch.cat(parts, dim=2)


class PaddedBackbone(nn.Module):
    """
    Wrap a fully convolutional backbone so that it accepts any input size: zero-pad the input at the end of each
    spatial axis to a multiple of ``multiple`` voxels, run the backbone, crop the output back.

    Args:
        net: the backbone, mapping [B, C, *spatial] to [B, C', *spatial] for sizes that are multiples of ``multiple``.
        multiple: the size multiple in voxels (``2**poolings`` of the backbone).
    """

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = int(multiple)

    @property
    def size_multiple(self) -> int:
        """
        Returns:
            the size multiple (voxels) that inputs are padded to.
        """
        return self.multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: the input batch, in shape [B, C, D, H, W].

        Returns:
            the backbone's output cropped to the input's spatial size, [B, C', D, H, W] (a DDF in voxels,
            [B, 3, D, H, W], for :func:`voxelmorph_vm2`).
        """
        x, spatial = pad_to_multiple(x, self.multiple)
        return _crop(self.net(x), spatial)


def voxelmorph_vm2(in_channels: int = 2, init_std: float = 1e-5, pad_multiple: int = 16) -> PaddedBackbone:
    """
    VoxelMorph VM-2 backbone (327,331 parameters) built from MONAI's ``VoxelMorphUNet``; it predicts a DDF directly.

    No integration: the non-diffeomorphic VM-2 of the ReVoxelMorph comparison (Sun & Simon, "A Resolution
    Enhancement Plug-in for Deformable Registration of Medical Images", Section IV-D, Table III).

    Source: G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag and A. V. Dalca, "VoxelMorph: A Learning Framework
    for Deformable Medical Image Registration", IEEE TMI 38(8), 2019 (VM-2 widths); MONAI
    ``monai.networks.nets.VoxelMorphUNet``.

    Args:
        in_channels: channels of the stacked input pair (2: moving, fixed).
        init_std: std of the normal init of the final 3-channel (DDF) conv; 0 gives an exactly zero initial field.
        pad_multiple: inputs are zero-padded at the end of each axis to a multiple of this size (voxels) and the
            output is cropped back (16 = 2**4 poolings).

    Returns:
        a :class:`PaddedBackbone` mapping [B, in_channels, D, H, W] to a DDF [B, 3, D, H, W] in voxels.
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
    """
    The resolution-enhanced registration cascade REM -> registration backbone (ReFDRN / ReVoxelMorph).

    Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section III-B, Fig. 2 and Eq. (2): ``y = REM(x)`` with the two images of the pair along the batch axis, then
    ``z = FDRN(y~)`` with ``y~`` the SR pair stacked as channels.

    Args:
        backbone: maps ``[B, 2, D, H, W]`` to a DDF ``[B, 3, D, H, W]``, or to ``(ddf, aux_ddf)``.
        rem: the (pretrained) resolution enhancement module mapping ``[N, 1, D, H, W]`` to the same shape, or
            ``None`` for the identity (the plain backbone on the trilinear-upsampled input, the paper's "↓↑"
            baseline). It is frozen and kept in eval mode, whatever ``train()`` says.
        rem_inferer: a MONAI-style inferer ``(inputs, network) -> outputs`` that runs REM when gradients are off
            (inference), e.g. ``scripts.fast_inference.HaloSlidingWindowInferer`` (window by window, the
            full-volume result); ``None`` runs REM on the whole volume. With gradients on, REM always runs whole.

    REM is deliberately *not* a registered submodule: ``state_dict()``, ``parameters()`` and DDP see only the
    backbone, so checkpoints never copy the ``rem_sr`` weights (they are loaded from that bundle). ``.to()``
    and friends still move it (``_apply``).

    ``forward(x)`` takes the pair stacked as channels ``[B, 2, D, H, W]`` (moving, fixed; trilinear-upsampled LR,
    the REM input grid) and returns the DDF, the bundle's ``network_def`` contract. ``register(moving, fixed)``
    returns ``{"ddf", "sr_moving", "sr_fixed"}`` plus ``"aux_ddf"`` when the backbone gives one; with
    ``sr_moving``/``sr_fixed`` given (precomputed REM outputs), REM is not run again. Gradients flow through REM
    (no ``torch.no_grad``); only its parameters receive none.

    Example::

        import torch
        from scripts.networks import FDRN, RegistrationCascade

        rem = torch.nn.Conv3d(1, 1, kernel_size=3, padding=1)  # stand-in for the rem_sr bundle's REM
        net = RegistrationCascade(FDRN(return_aux=True), rem)
        moving_lr = torch.rand(1, 1, 32, 32, 32)                # trilinear-upsampled LR images
        fixed_lr = torch.rand(1, 1, 32, 32, 32)
        ddf = net(torch.cat([moving_lr, fixed_lr], dim=1))      # [1, 3, 32, 32, 32], voxels
        out = net.register(moving_lr, fixed_lr)                 # dict: ddf, aux_ddf, sr_moving, sr_fixed
        assert ddf.shape == out["ddf"].shape == (1, 3, 32, 32, 32)
        assert out["sr_moving"].shape == moving_lr.shape
        assert all(k.startswith("backbone.") for k in net.state_dict())  # REM's weights are not saved
    """

    def __init__(self, backbone: nn.Module, rem: nn.Module | None = None, rem_inferer=None) -> None:
        super().__init__()
        self.backbone = backbone
        self.rem_inferer = rem_inferer
        self._rem = (rem,)  # a tuple hides the module from nn.Module's registry
        if rem is not None:
            rem.requires_grad_(False)
            rem.eval()

    @property
    def rem(self) -> nn.Module | None:
        """
        Returns:
            the frozen REM (not a registered submodule), or ``None`` for the identity.
        """
        return self._rem[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.rem is not None:
            self.rem._apply(fn)
        return self

    def train(self, mode: bool = True) -> RegistrationCascade:
        """
        Set the backbone's training mode; REM always stays in eval mode.

        Args:
            mode: training (true) or evaluation (false) mode for the backbone.

        Returns:
            self.
        """
        super().train(mode)
        if self.rem is not None:
            self.rem.eval()
        return self

    def trainable_parameters(self):
        """
        Returns:
            a generator over the parameters an optimiser should see (the backbone's ones with ``requires_grad``).
        """
        return (p for p in self.parameters() if p.requires_grad)

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """
        Apply the frozen REM (Eq. (2), ``y = REM(x)``), with gradients flowing through it.

        Args:
            x: trilinear-upsampled LR images, one image per batch entry, in shape [N, 1, D, H, W].

        Returns:
            ``REM(x)``, same shape as ``x`` (``x`` itself when there is no REM).
        """
        if self.rem is None:
            return x
        if self.rem_inferer is not None and not torch.is_grad_enabled() and not exporting():
            # inference: window by window, memory bounded by the window (training keeps the graph whole)
            return self.rem_inferer(x, self.rem)
        return self.rem(x)

    def register(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        sr_moving: torch.Tensor | None = None,
        sr_fixed: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Register a pair: super-resolve each image with REM, then run the backbone on the SR pair.

        Args:
            moving: the trilinear-upsampled LR moving image, in shape [B, 1, D, H, W].
            fixed: the trilinear-upsampled LR fixed image, same shape as ``moving``.
            sr_moving: precomputed ``REM(moving)`` [B, 1, D, H, W]; REM is run only when it or ``sr_fixed`` is None.
            sr_fixed: precomputed ``REM(fixed)`` [B, 1, D, H, W].

        Returns:
            a dict with ``"ddf"`` (the DDF [B, 3, D, H, W] in voxels, MONAI ``Warp`` convention), ``"sr_moving"``
            and ``"sr_fixed"`` (the SR images [B, 1, D, H, W]) and, when the backbone returns one, ``"aux_ddf"``
            (the coarse auxiliary DDF in coarse-grid voxels).

        Raises:
            ValueError: when ``moving`` and ``fixed`` differ in shape or are not 5-dimensional.
        """
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
        """
        DDF of the pair ``x = [moving, fixed]`` (the bundle's ``network_def`` contract).

        Args:
            x: the trilinear-upsampled LR moving and fixed images stacked as channels, in shape [B, 2, D, H, W].
            precomputed_sr: ``x`` already holds REM's outputs (training with cached SR volumes); REM is not run.
            return_dict: return the full :meth:`register` dict instead of the DDF (so that it goes through DDP).

        Returns:
            the DDF [B, 3, D, H, W] in voxels, or the :meth:`register` dict when ``return_dict``.

        Raises:
            ValueError: when ``x`` is not in shape [B, 2, D, H, W].
        """
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"expected the pair as [B, 2, D, H, W] (moving, fixed), got {tuple(x.shape)}")
        moving, fixed = x[:, :1], x[:, 1:]
        out = self.register(moving, fixed, *((moving, fixed) if precomputed_sr else (None, None)))
        return out if return_dict else out["ddf"]


def build_registration_network(
    backbone: str = "fdrn",
    rem: nn.Module | None = None,
    fdrn_channels: Sequence[int] = (16, 32, 32, 32, 32),
    fdrn_num_res: int = 2,
    return_aux: bool = True,
    rem_inferer=None,
) -> RegistrationCascade:
    """
    The bundle's ``network_def``: REM (or the identity) followed by FDRN or VoxelMorph VM-2.

    Source: the ReFDRN / ReVoxelMorph cascades of Sun & Simon, "A Resolution Enhancement Plug-in for Deformable
    Registration of Medical Images", Section III-B and Section IV-D.

    Args:
        backbone: ``"fdrn"`` or ``"voxelmorph"`` (alias ``"vm2"``), case-insensitive.
        rem: the frozen REM (see ``scripts.rem_loader.load_rem``), or ``None`` for the identity.
        fdrn_channels: FDRN widths per level (see :class:`FDRN`); ignored for VoxelMorph.
        fdrn_num_res: FDRN residual convs per stage; ignored for VoxelMorph.
        return_aux: FDRN also returns the auxiliary coarse DDF; ignored for VoxelMorph.
        rem_inferer: runs REM when gradients are off (inference), e.g. ``scripts.fast_inference.
            HaloSlidingWindowInferer()``: the full-volume result with the memory of one window. ``None``: REM on the
            whole volume.

    Returns:
        a :class:`RegistrationCascade`.

    Raises:
        ValueError: for an unknown ``backbone``, or invalid FDRN widths (see :class:`FDRN`).
    """
    name = str(backbone).lower()
    if name == "fdrn":
        net = FDRN(channels=tuple(fdrn_channels), num_res=fdrn_num_res, return_aux=return_aux)
    elif name in ("voxelmorph", "vm2"):
        net = voxelmorph_vm2()
    else:
        raise ValueError(f"unknown backbone {backbone!r}; use 'fdrn' or 'voxelmorph'")
    return RegistrationCascade(net, rem, rem_inferer=rem_inferer)
