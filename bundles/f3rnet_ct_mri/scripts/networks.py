"""F3RNet: Full-Resolution Residual Registration Network.

Source: Z. Xu, J. Luo, J. Yan, X. Li and J. Jayender, "F3RNet: Full-Resolution Residual Registration Network for
Multimodal Image Registration", Fig. 1, Sections 2.1-2.4, Eqs. (1)-(2), Table 1 (F3D variants) and Table 2
(parameter counts).

The network takes the moving and the fixed image stacked as 2 channels, ``[B, 2, D, H, W]`` (channel 0 = moving,
channel 1 = fixed), and returns a dense displacement field (DDF) ``[B, 3, D, H, W]`` in voxel units. Channel ``i``
is the displacement along spatial axis ``i`` of the input tensor, which is what ``monai.networks.blocks.Warp``
expects, so ``Warp()(moving, net(torch.cat([moving, fixed], 1)))`` resamples the moving image onto the fixed grid.

The paper has no public code and Fig. 1 gives no layer list, so the topology below was inferred: it follows the
text (two parallel streams, 16 / 32 channels, N = 4 poolings, RB and MRB as in Fig. 1(b)/(c)) and was then fixed
by matching the seven parameter counts of Table 2 numerically (see the table at the end).

Building blocks
---------------
- ``conv``: a 3x3x3 convolution (bias) followed by LeakyReLU(0.2).
- ``RB`` (residual block, Eq. 1): ``z + R(z)`` with ``R`` = two 3x3x3 convs, each followed by LeakyReLU(0.2).
- ``MRB`` (multi-scale residual block, Eq. 2): max-pool the full-resolution features ``l`` (16 ch) to the
  resolution of the multi-scale features ``h`` (32 ch), concatenate (48 ch), ``conv`` 48->32, ``RB`` (32 ch),
  giving ``h_n``; then a 1x1x1 conv 32->16 and a trilinear upsample back to full resolution give the residual
  added to ``l``: ``l_n = l + up(conv1x1(h_n))``.
- ``F3D`` (Section 2.4): a 3x3x3 convolution is factorised into a 3x3x1 conv followed by a 1x1x3 conv (the 1x1x3
  one works across slices, i.e. along the last spatial axis). Inferred details, chosen because they are the
  only natural reading found that reproduces Table 2 (see "Why this F3D" below):

  * a stand-alone ``conv`` a->b becomes ``3x3x1 conv (a->b) + LeakyReLU + 1x1x3 conv (b->b) + LeakyReLU``;
  * an ``RB`` branch (two 3x3x3 convs) becomes *one* F3D block: its first conv becomes the 3x3x1 conv and its
    second conv the 1x1x3 conv (``z + LReLU(conv1x1x3(LReLU(conv3x3x1(z))))``);
  * every conv keeps its bias; LeakyReLU(0.2) sits between the two factors.
  * Never factorised: the 1x1x1 convs of the MRBs and the final 3-channel DDF conv (Section 3.2.1: "except for
    the final 3-channel 3D convolution used to generate the deformation field").

Topology (defaults: 16 FR channels, 32 MS channels, N = 4)
----------------------------------------------------------
Inputs are padded (replicate by default) to a multiple of 16 inside ``forward`` and the DDF is cropped back.

===== ========== ================ ========================================================= =========
step  stream     resolution       blocks                                                    F3D group
===== ========== ================ ========================================================= =========
1     FR         1/1              ``conv`` 2->16                                            fr
2     FR         1/1              2 x ``RB`` (16)                                           fr
3     MS stem    1/2              max-pool(l) -> ``conv`` 16->32 = h0                       encoder
4     MS enc     1/2              ``MRB`` (h0)                                              encoder
5     MS enc     1/4              max-pool(h) -> ``MRB``                                    encoder
6     MS enc     1/8              max-pool(h) -> ``MRB``                                    encoder
7     MS enc     1/16 (bottom)    max-pool(h) -> ``MRB`` (+2 more ``MRB`` for all_more_mrb) encoder
8     MS dec     1/8              up(h) + skip(step 6 h) -> ``MRB``                         decoder
9     MS dec     1/4              up(h) + skip(step 5 h) -> ``MRB``                         decoder
10    MS dec     1/2              up(h) + skip(step 4 h) -> ``MRB``                         decoder
11    FR         1/1              2 x ``RB`` (16)                                           fr
12    FR         1/1              ``conv`` 16->16                                           fr
13    FR         1/1              3x3x3 conv 16->3 (no activation) = DDF                    never
===== ========== ================ ========================================================= =========

So there are 7 MRBs (4 on the encoder path, the bottom one included, and 3 on the decoder path), each adding a
residual to the full-resolution stream; the MS stream's skips are additions (as in the paper), and the MS
upsampling (x2) and the MRB upsampling (to full resolution) are trilinear. The MRB convs run at the MS
resolution and count as MS stream (encoder or decoder); the FR group is the head, the 4 RBs and the tail conv.

``f3d`` selects where F3D is used (Table 1): ``none``; ``all`` (fr + encoder + decoder); ``encoder``;
``decoder``; ``fr``; ``ms`` (encoder + decoder); ``all_more_mrb`` (all, plus two extra MRBs at 1/16).

Parameter counts (this implementation vs. Table 2 of the paper)
---------------------------------------------------------------
============== ========== ======= =======
f3d            this code  paper   diff
============== ========== ======= =======
none           760,131    0.746M  +1.9%
fr             713,507    0.697M  +2.4%
decoder        557,475    0.544M  +2.5%
encoder        483,811    0.488M  -0.9%
all_more_mrb   294,211    0.296M  -0.6%
ms             281,155    0.286M  -1.7%
all            234,531    0.236M  -0.6%
============== ========== ======= =======

Why this F3D: with the textbook factorisation of every conv (3x3x1 a->b + 1x1x3 b->b) a conv keeps >= 40% of
its weights, so "all" cannot drop below ~0.3M from ~0.75M; a depthwise 1x1x3 still keeps 1/3 (>= 0.249M, outside
5% of 0.236M). Replacing each RB's conv pair by one F3D block keeps 2/9 of an RB, and then
``all_more_mrb - all = 2 x 29,840`` matches the paper's 0.060M for two extra (F3D) MRBs. A numerical search over
F3D forms and topologies (1-2 MRBs per encoder level, 0-2 per decoder level, 0-8 FR RBs, extra FR/MS convs,
with/without an MS stem, bottom level in encoder or decoder) gave a worst-case error of 2.5% for this design,
4.9% at best with a depthwise 1x1x3, and 18.8% at best with the textbook pair.
Other inferred choices: LeakyReLU slope 0.2, max pooling, trilinear upsampling, the 1x1x1 conv reads the RB
output ``h_n``, and the DDF conv starts near zero (N(0, 1e-5) weights, zero bias) as in VoxelMorph.

``F3RNet`` (the network alone, without ``Warp``) is scriptable with ``torch.jit.script``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import count_parameters  # noqa: F401  (re-exported: parameter counts in docs and tests)
from .fast_inference import float32_conv

F3D_VARIANTS = ("none", "all", "encoder", "decoder", "fr", "ms", "all_more_mrb")

# F3D groups that each variant factorises (Table 1 of the paper).
_F3D_GROUPS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "all": frozenset({"fr", "encoder", "decoder"}),
    "encoder": frozenset({"encoder"}),
    "decoder": frozenset({"decoder"}),
    "fr": frozenset({"fr"}),
    "ms": frozenset({"encoder", "decoder"}),
    "all_more_mrb": frozenset({"fr", "encoder", "decoder"}),
}

# Parameter counts reported in Table 2 of the paper (millions).
PAPER_PARAMS_M = {
    "none": 0.746,
    "all": 0.236,
    "encoder": 0.488,
    "decoder": 0.544,
    "fr": 0.697,
    "ms": 0.286,
    "all_more_mrb": 0.296,
}

NEGATIVE_SLOPE = 0.2


def _act() -> nn.Module:
    # in place, always on a convolution's fresh output: one feature map less per layer, the same numbers
    return nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)


class ConvAct(nn.Sequential):
    """
    A 3x3x3 convolution + LeakyReLU(0.2), or its factorised (F3D) form: 3x3x1 conv + LeakyReLU + 1x1x3 conv +
    LeakyReLU (the 1x1x3 conv works along the last spatial axis, across slices). Zero padding keeps the size.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.4 and Fig. 2(c) (factorised 3D convolution).

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels.
        factorised: use the F3D form.

    Calling the module maps [B, in_channels, D, H, W] to [B, out_channels, D, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, factorised: bool = False) -> None:
        if factorised:
            layers = [
                nn.Conv3d(in_channels, out_channels, kernel_size=(3, 3, 1), padding=(1, 1, 0)),
                _act(),
                nn.Conv3d(out_channels, out_channels, kernel_size=(1, 1, 3), padding=(0, 0, 1)),
                _act(),
            ]
        else:
            layers = [nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1), _act()]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """
    Residual block (RB): ``z_n = z_{n-1} + R(z_{n-1})`` with ``R`` two 3x3x3 convs each followed by LeakyReLU(0.2),
    or one F3D block (3x3x1 conv + LeakyReLU + 1x1x3 conv + LeakyReLU) when ``factorised``.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.2, Eq. (1), Fig. 1(b); the F3D form is inferred (see the module docstring).

    Args:
        channels: number of input and output channels.
        factorised: use the F3D form of the residual branch.
    """

    def __init__(self, channels: int, factorised: bool = False) -> None:
        super().__init__()
        if factorised:
            self.branch = nn.Sequential(
                nn.Conv3d(channels, channels, kernel_size=(3, 3, 1), padding=(1, 1, 0)),
                _act(),
                nn.Conv3d(channels, channels, kernel_size=(1, 1, 3), padding=(0, 0, 1)),
                _act(),
            )
        else:
            self.branch = nn.Sequential(
                nn.Conv3d(channels, channels, kernel_size=3, padding=1),
                _act(),
                nn.Conv3d(channels, channels, kernel_size=3, padding=1),
                _act(),
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z: features in shape [B, channels, D, H, W].

        Returns:
            ``z + R(z)``, same shape as ``z``.
        """
        return z + self.branch(z)


class MultiScaleResidualBlock(nn.Module):
    """
    Multi-scale residual block (MRB) between the full-resolution features ``l`` and the multi-scale features ``h``.

    ``h_n = RB(conv(cat(maxpool(l), h)))`` and ``l_n = l + upsample(conv1x1x1(h_n))`` (trilinear upsampling).

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.3, Eq. (2), Fig. 1(c).

    Args:
        fr_channels: channels of the full-resolution stream (``l``).
        ms_channels: channels of the multi-scale stream (``h``).
        factor: the size ratio between ``l`` and ``h`` (a power of 2; 1 means the same resolution).
        factorised: use the F3D form of the 3x3x3 convs (the 1x1x1 conv is never factorised).
    """

    def __init__(self, fr_channels: int, ms_channels: int, factor: int, factorised: bool = False) -> None:
        super().__init__()
        self.factor = int(factor)
        self.fuse = ConvAct(fr_channels + ms_channels, ms_channels, factorised)
        self.rb = ResidualBlock(ms_channels, factorised)
        self.proj = nn.Conv3d(ms_channels, fr_channels, kernel_size=1)

    def forward(self, l: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: E741
        """
        Args:
            l: full-resolution features [B, fr_channels, D, H, W].
            h: multi-scale features [B, ms_channels, D / factor, H / factor, W / factor]; the sizes must divide
                exactly (F3RNet pads its input so that they do).

        Returns:
            ``(l_n, h_n)``: the updated full-resolution features (shape of ``l``) and the new multi-scale features
            (shape of ``h``).

        Raises:
            RuntimeError: when the pooled ``l`` and ``h`` do not have the same spatial size (``torch.cat``).
        """
        pooled = F.max_pool3d(l, kernel_size=self.factor, stride=self.factor) if self.factor > 1 else l
        h_n = self.rb(self.fuse(torch.cat([pooled, h], dim=1)))
        residual = self.proj(h_n)
        if self.factor > 1:
            residual = F.interpolate(residual, size=l.shape[2:], mode="trilinear", align_corners=False)
        return l + residual, h_n


class F3RNet(nn.Module):
    """
    F3RNet registration network: maps a stacked moving/fixed pair [B, 2, D, H, W] to a dense displacement field
    (DDF) [B, 3, D, H, W] in voxels, with a full-resolution stream and a multi-scale residual stream fused by MRBs.

    Source: Z. Xu, J. Luo, J. Yan, X. Li and J. Jayender, "F3RNet: Full-Resolution Residual Registration Network for
    Multimodal Image Registration", Section 2.1 and Fig. 1(a) (the two streams), Sections 2.2-2.4 (RB, MRB, F3D),
    Table 1 (the F3D variants); no public code, see the module docstring for the inferred topology.

    Args:
        f3d: where factorised 3D convolutions replace 3x3x3 convs, one of ``F3D_VARIANTS``.
        in_channels: input channels (2: moving and fixed image).
        out_channels: DDF channels (3).
        fr_channels: channels of the full-resolution stream (16 in the paper).
        ms_channels: channels of the multi-scale residual stream (32 in the paper).
        levels: number of poolings N of the multi-scale stream (4: the coarsest level is 1/16).
        extra_bottom_mrbs: extra MRBs at the coarsest level; ``None`` means 2 for ``all_more_mrb``, else 0.
        pad_mode: ``"replicate"`` or ``"constant"`` (zeros), used to pad inputs to a multiple of ``2**levels``.

    See the module docstring for the topology and the parameter counts.

    Raises:
        ValueError: for an unknown ``f3d`` variant, ``levels < 1`` or an unknown ``pad_mode``.

    Example::

        import torch
        from monai.networks.blocks import Warp
        from scripts.networks import F3RNet

        net = F3RNet(f3d="none")                        # F3RNet-w/o F3D, 760,131 parameters (paper: 0.746M)
        moving = torch.rand(1, 1, 36, 32, 40)           # e.g. CT, intensities in [0, 1]
        fixed = torch.rand(1, 1, 36, 32, 40)            # e.g. MR
        ddf = net(torch.cat([moving, fixed], dim=1))    # padded to 48x32x48 inside, cropped back
        assert ddf.shape == (1, 3, 36, 32, 40)          # voxels, channel i along spatial axis i
        warped = Warp()(moving, ddf)                    # moving resampled onto the fixed grid
    """

    def __init__(
        self,
        f3d: str = "none",
        in_channels: int = 2,
        out_channels: int = 3,
        fr_channels: int = 16,
        ms_channels: int = 32,
        levels: int = 4,
        extra_bottom_mrbs: int | None = None,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        key = str(f3d).lower()
        if key not in _F3D_GROUPS:
            raise ValueError(f"unknown F3RNet f3d variant {f3d!r}; valid values are {', '.join(F3D_VARIANTS)}")
        if levels < 1:
            raise ValueError(f"F3RNet needs levels >= 1, got {levels}")
        if pad_mode not in ("replicate", "constant"):
            raise ValueError(f"pad_mode must be 'replicate' or 'constant', got {pad_mode!r}")
        if extra_bottom_mrbs is None:
            extra_bottom_mrbs = 2 if key == "all_more_mrb" else 0
        self.f3d = key
        self.in_channels = in_channels
        self.levels = levels
        self.size_multiple = 2**levels  # inputs are padded internally to a multiple of this size
        self.pad_mode = pad_mode
        groups = _F3D_GROUPS[key]
        fr, enc, dec = "fr" in groups, "encoder" in groups, "decoder" in groups

        # full-resolution stream, before the MRBs
        self.head = ConvAct(in_channels, fr_channels, fr)
        self.fr_pre = nn.Sequential(ResidualBlock(fr_channels, fr), ResidualBlock(fr_channels, fr))
        # multi-scale residual stream: stem at 1/2, encoder MRBs at 1/2 .. 1/2**levels, decoder back to 1/2
        self.ms_stem = ConvAct(fr_channels, ms_channels, enc)
        self.encoder = nn.ModuleList(
            MultiScaleResidualBlock(fr_channels, ms_channels, 2 ** (i + 1), enc) for i in range(levels)
        )
        self.bottom = nn.ModuleList(
            MultiScaleResidualBlock(fr_channels, ms_channels, 2**levels, enc) for _ in range(extra_bottom_mrbs)
        )
        self.decoder = nn.ModuleList(
            MultiScaleResidualBlock(fr_channels, ms_channels, 2**i, dec) for i in range(levels - 1, 0, -1)
        )
        # full-resolution stream, after the MRBs
        self.fr_post = nn.Sequential(ResidualBlock(fr_channels, fr), ResidualBlock(fr_channels, fr))
        self.tail = ConvAct(fr_channels, fr_channels, fr)
        self.flow = nn.Conv3d(fr_channels, out_channels, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Pad [B, C, D, H, W] at the end of each spatial axis to a multiple of ``size_multiple``; also return the
        original spatial size."""
        shape = [int(s) for s in x.shape[2:]]
        m = self.size_multiple
        pads: list[int] = []
        for s in shape[::-1]:  # F.pad wants the last axis first
            pads += [0, (m - s % m) % m]
        if sum(pads) > 0:
            x = F.pad(x, pads, mode=self.pad_mode)
        return x, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Predict the DDF that warps the moving image (channel 0) onto the fixed image (channel 1).

        Args:
            x: the moving and fixed images stacked as channels, in shape [B, in_channels, D, H, W] (any size: it is
                padded at the end of each axis to a multiple of ``2**levels`` voxels and the DDF is cropped back).

        Returns:
            the DDF [B, out_channels, D, H, W] in voxels of the input grid, channel ``i`` along spatial axis ``i``
            (the ``monai.networks.blocks.Warp`` convention).

        Raises:
            ValueError: when ``x`` is not 5-dimensional or does not have ``in_channels`` channels.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"F3RNet expects a [B, {self.in_channels}, D, H, W] tensor (moving and fixed stacked), "
                f"got shape {list(x.shape)}"
            )
        x, shape = self._pad(x)

        l = self.fr_pre(self.head(x))  # noqa: E741
        h = self.ms_stem(F.max_pool3d(l, kernel_size=2, stride=2))
        skips: list[torch.Tensor] = []
        for i, mrb in enumerate(self.encoder):
            if i > 0:
                h = F.max_pool3d(h, kernel_size=2, stride=2)
            l, h = mrb(l, h)  # noqa: E741
            skips.append(h)
        skips.pop()  # the bottom level has no skip
        for mrb in self.bottom:
            l, h = mrb(l, h)  # noqa: E741
        for mrb in self.decoder:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False) + skip
            l, h = mrb(l, h)  # noqa: E741
        features = self.tail(self.fr_post(l))
        # the DDF head in float32 under autocast (eager; TorchScript runs the plain convolution)
        ddf = self.flow(features) if torch.jit.is_scripting() else float32_conv(self.flow, features)
        return ddf[:, :, : shape[0], : shape[1], : shape[2]]


def parameter_table(variants: Sequence[str] = F3D_VARIANTS) -> dict[str, tuple[int, float]]:
    """
    Compare the parameter counts of this implementation with Table 2 of Xu et al., "F3RNet: Full-Resolution
    Residual Registration Network for Multimodal Image Registration".

    Args:
        variants: the F3D variants to build (default: all of ``F3D_VARIANTS``).

    Returns:
        ``{variant: (parameters of this implementation, paper count)}``, for the model card and the tests.

    Raises:
        ValueError: for an unknown variant (raised by :class:`F3RNet`).
    """
    return {v: (count_parameters(F3RNet(f3d=v)), PAPER_PARAMS_M[v] * 1e6) for v in variants}


if __name__ == "__main__":  # python scripts/networks.py: print the parameter table
    for name, (ours, paper) in parameter_table().items():
        print(f"{name:13s} {ours:9,d} paper {paper / 1e6:.3f}M  {100 * (ours / paper - 1):+.1f}%")
