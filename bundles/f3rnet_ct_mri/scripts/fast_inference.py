"""Inference at the hardware's speed, with the results of the plain full-volume float32 forward pass.

Shared by the three bundles (identical copies, kept in sync by ``tools/sync_common.py`` and checked by
``tests/test_common_copies.py``). What each piece does, and why:

- :func:`autocast_dtype` / the ``precision`` config key: on a CPU with native bfloat16 (AVX512-BF16 or AMX, as
  oneDNN reports it), ``"auto"`` runs the convolutions in bfloat16 (PyTorch's ``torch.autocast("cpu")``); about
  2-3x faster than float32 there. Elsewhere ``"auto"`` is float32. On CUDA the bundles' ``amp`` flag (float16
  autocast) governs instead.
- :class:`InferenceModeInferer`: any MONAI inferer under ``torch.inference_mode`` and that autocast; the outputs come
  back as ordinary float32 tensors, so the postprocessing can change them in place.
- :func:`inference_network`: the network in PyTorch's ``channels_last_3d`` memory format, which oneDNN's 3D
  convolutions run fastest on (the same numbers in fp32).
- :func:`set_threads` / the ``threads`` config key: the intra-op thread count a user can set.
- :func:`float32_conv`: the registration networks' DDF heads stay float32 under autocast.
- :func:`exporting`: TorchScript tracing and ``torch.export`` (ONNX) skip the shape-dependent fast paths.
- :class:`HaloSlidingWindowInferer`: MONAI's ``sliding_window_inference`` for a fully convolutional network with a
  finite receptive field (REM): windows overlap by twice the receptive radius and each voxel is taken from a
  window in which its whole receptive field lies, so the result equals the full-volume forward pass (to float
  rounding) while the memory is bounded by the window; the window shape is planned so that the windows add as
  few voxels as possible.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer, sliding_window_inference

from .common import BundleInputError

PRECISIONS = ("auto", "fp32", "bf16")


# ------------------------------------------------------------------------------------------------ precision
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype the convolutions run in on `device` under the ``precision`` setting; ``None`` means float32.

    Args:
        precision: ``"auto"`` (bfloat16 on a CPU with native bfloat16, else float32), ``"fp32"`` or ``"bf16"``
            (bfloat16 on any CPU; emulated, hence slow, without native support); case-insensitive.
        device: the device the network runs on. Only the CPU is affected: on CUDA the ``amp`` flag governs.

    Returns:
        ``torch.bfloat16`` or ``None``.

    Raises:
        BundleInputError: (a ``ValueError``) when `precision` is not one of ``PRECISIONS``.
    """
    name = str(precision).lower()
    if name not in PRECISIONS:
        raise BundleInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if torch.device(device).type != "cpu" or name == "fp32":
        return None
    if name == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _detached_float(out):
    """`out` (a tensor, or a dict/list/tuple of them) as float32 tensors made outside inference mode."""
    if isinstance(out, torch.Tensor):
        return out.to(torch.float32, copy=True) if out.is_floating_point() else out.clone()
    if isinstance(out, dict):
        return {k: _detached_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_detached_float(v) for v in out)
    return out


class InferenceModeInferer(Inferer):
    """Another MONAI inferer under ``torch.inference_mode`` and, on the CPU, bfloat16 autocast.

    The outputs (a tensor, or a dict/tuple of tensors; MetaTensors keep their metadata) are returned as float32
    copies made outside inference mode, so the postprocessing may modify them in place. The copy costs one pass
    over the outputs.

    The wall time of the last call, in seconds, is kept in ``last_seconds`` (the bundles print it per case as the
    network time).

    Source: ``torch.inference_mode`` and ``torch.autocast("cpu", dtype=torch.bfloat16)`` (PyTorch), oneDNN's
    bfloat16 convolutions.

    Args:
        inferer: the wrapped inferer (``SimpleInferer()`` when ``None``).
        precision: see :func:`autocast_dtype`.

    Raises:
        BundleInputError: (at construction) when `precision` is not one of ``PRECISIONS``.
    """

    def __init__(self, inferer: Inferer | None = None, precision: str = "auto") -> None:
        super().__init__()
        autocast_dtype(precision)  # a wrong value fails when the config is parsed, not after the loading
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.precision = precision
        self.last_seconds: float | None = None

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        """Run the wrapped inferer on `inputs` [B, C, *spatial]; returns its outputs as float32 tensors."""
        dtype = autocast_dtype(self.precision, inputs.device)
        start = time.perf_counter()
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = self.inferer(inputs, network, *args, **kwargs)
        out = _detached_float(out)
        if inputs.device.type == "cuda":
            torch.cuda.synchronize(inputs.device)
        self.last_seconds = time.perf_counter() - start
        return out


def halo_slabs(depth: int, slab: int, halo: int):
    """The slabs of an axis of `depth` voxels, `slab` at a time, each read with `halo` extra voxels on both sides
    (clipped to the axis): yields ``(start, stop, low, high)``, the slab ``[start, stop)`` and the rows
    ``[low, high)`` to compute it from (crop ``[start - low, stop - low)`` of the result)."""
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        yield start, stop, max(start - halo, 0), min(stop + halo, depth)


def float32_conv(conv: torch.nn.Conv3d, h: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """``conv(h)`` in float32 even under autocast: the networks' DDF heads, so that a bfloat16 or float16 forward
    pass gives a displacement field with float32 resolution (bfloat16 keeps 8 significant bits: steps of 0.03
    voxels at 8 voxels).

    Without gradients, ``h`` is cast up `slab` slices at a time (each slab with the kernel's halo, cropped after the
    convolution: the same result), so no float32 copy of the whole feature map is made. Outside autocast it is
    ``conv(h)``.

    Args:
        conv: a stride-1 convolution with ``padding = kernel_size // 2`` (a "same" convolution).
        h: features [B, C, D, *spatial].
        slab: slices along D per float32 chunk.

    Returns:
        ``conv(h)`` in float32, [B, C_out, D, *spatial].
    """
    if not torch.is_autocast_enabled(h.device.type):
        return conv(h)
    with torch.autocast(h.device.type, enabled=False):
        halo = int(conv.padding[0]) if isinstance(conv.padding, tuple) else 0
        if torch.is_grad_enabled() or h.shape[2] <= slab or isinstance(conv.padding, str) or conv.stride[0] != 1:
            return conv(h.float())
        parts = [
            conv(h[:, :, low:high].float())[:, :, start - low : stop - low]
            for start, stop, low, high in halo_slabs(h.shape[2], slab, halo)
        ]
        return torch.cat(parts, dim=2)


def exporting() -> bool:
    """Whether the code runs under a TorchScript trace or ``torch.export``/``torch.compile`` (ONNX export): the
    shape-dependent fast paths (windows, slabs) are skipped there, so that the exported graph stays shape-generic."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def inference_network(network: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """`network` on `device` in the ``channels_last_3d`` memory format (oneDNN's fastest layout for 3D convolutions;
    the results are the same). Weights loaded afterwards (``CheckpointLoader``) keep the layout."""
    return network.to(device=device, memory_format=torch.channels_last_3d)


def set_threads(threads: int | str | None = None) -> int:
    """Set PyTorch's intra-op thread count (the ``threads`` config key); ``None`` keeps PyTorch's default (the
    ``OMP_NUM_THREADS`` environment variable, else one thread per core).

    Returns:
        the thread count now in use.

    Raises:
        BundleInputError: (a ``ValueError``) when `threads` is not a positive integer or ``None``.
    """
    if threads is not None and str(threads).lower() not in ("none", "null", ""):
        try:
            count = int(threads)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or str(count) != str(threads).strip():
            raise BundleInputError(f"--threads must be a positive integer (or null for the default), got {threads!r}")
        torch.set_num_threads(count)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ windows
def axis_windows(size: int, count: int, halo: int) -> tuple[int, int] | None:
    """The smallest window length and step that tile an axis of `size` voxels with `count` evenly spaced windows.

    The windows start at ``0, step, 2 * step, ...`` and the last one ends exactly at `size`; adjacent windows overlap
    by at least ``2 * halo`` voxels (so every voxel lies at least `halo` voxels inside some window), and the step is
    at least `halo` (so only the first and the last window reach within `halo` voxels of the volume's faces).

    Returns:
        ``(length, step)``, ``(size, 0)`` for one window, or ``None`` when `count` windows cannot satisfy this.
    """
    if count == 1:
        return size, 0
    length = math.ceil((size + (count - 1) * 2 * halo) / count)
    while length < size and (size - length) % (count - 1):
        length += 1
    step = (size - length) // (count - 1)
    if length >= size or step < max(halo, 1) or length - step < 2 * halo:
        return None
    return length, step


def _axis_options(size: int, halo: int) -> list[tuple[int, tuple[int, int]]]:
    """Every distinct ``(count, (length, step))`` tiling of one axis (:func:`axis_windows`), fewest windows first."""
    options: dict[int, tuple[int, tuple[int, int]]] = {}
    for count in range(1, max(1, size // max(halo, 1)) + 1):
        window = axis_windows(size, count, halo)
        if window is not None and window[0] not in options:
            options[window[0]] = (count, window)
    return sorted(options.values())


def _overlap(length: int, step: int) -> float:
    # MONAI's step is int(roi * (1 - overlap)): half a voxel of margin keeps float rounding off the floor
    return 0.0 if step == 0 else 1 - (step + 0.5) / length


def window_plan(
    spatial_size: Sequence[int], halo: int, max_window_voxels: int
) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """The window shape for :class:`HaloSlidingWindowInferer` that processes the fewest voxels in all.

    Every combination of window counts per axis (:func:`axis_windows`) is tried; among the windows of at most
    `max_window_voxels` voxels the one that processes the fewest voxels wins (ties: fewer windows). When none is
    that small (a thin axis cannot be split with the halo), the smallest window wins. The overlap fractions make
    MONAI's ``sliding_window_inference`` place the windows exactly at ``0, step, 2 * step, ...``.

    Args:
        spatial_size: the volume's spatial shape.
        halo: the network's receptive radius in voxels (each output voxel depends on ``halo`` input voxels on each
            side).
        max_window_voxels: the largest window, in voxels (it bounds the memory: about ``channels x voxels x bytes``
            per feature map).

    Returns:
        ``(roi_size, overlap, processed_voxels)``: the window shape, the per-axis overlap fractions to pass to MONAI,
        and the voxels processed by all windows.
    """
    best = None
    for choice in itertools.product(*(_axis_options(int(s), halo) for s in spatial_size)):
        roi = tuple(length for _, (length, _) in choice)
        windows = math.prod(count for count, _ in choice)
        voxels = math.prod(roi)
        key = (voxels > max_window_voxels, voxels if voxels > max_window_voxels else 0, windows * voxels, windows)
        if best is None or key < best[0]:
            best = (key, roi, tuple(_overlap(*w) for _, w in choice))
    return best[1], best[2], best[0][2]


def halo_weight_map(roi_size: Sequence[int], spatial_size: Sequence[int], halo: int, eps: float = 1e-6) -> torch.Tensor:
    """The blending weights of one window: the product over the axes of 1 inside and `eps` within `halo` voxels of
    a window face (axes that the window spans entirely: 1 everywhere, both faces being the volume's faces).

    A voxel is thus taken, up to a relative ``eps``, from the window in which it lies farthest from the faces
    that cut the volume, where its whole receptive field lies inside the window: the full-volume result.

    Returns:
        a float32 tensor of shape ``roi_size``.
    """
    weights = torch.ones(tuple(roi_size))
    for axis, (r, s) in enumerate(zip(roi_size, spatial_size)):
        if r >= s or halo == 0:
            continue
        w = torch.ones(r)
        w[:halo] = eps
        w[r - halo :] = eps
        shape = [1] * len(roi_size)
        shape[axis] = r
        weights = weights * w.reshape(shape)
    return weights


class HaloSlidingWindowInferer(Inferer):
    """Sliding-window inference that equals the full-volume forward pass of a network with a finite receptive field.

    MONAI's ``sliding_window_inference`` runs the windows; this class chooses them. Adjacent windows overlap by at
    least ``2 * halo`` voxels, and the blending weights (:func:`halo_weight_map`) take each voxel from the
    window in which its receptive field lies whole, so the zero padding at a window face never reaches the result.
    Peak memory is bounded by the window, not the volume; the window shape is planned per volume
    (:func:`window_plan`) so that the overlaps add as few voxels as possible (two windows of 160x114x176 for a
    160x208x176 volume at the default 4.2 M voxels: 1.10x the volume's voxels).

    Source: MONAI ``sliding_window_inference`` (windows, ``roi_weight_map`` blending); the halo rule is the exact
    tiling of a convolution with a finite receptive field.

    Args:
        halo: the receptive radius in voxels; ``None`` reads the network's ``receptive_radius`` attribute (REM has
            one: ``n + 2``).
        roi_size: ``"auto"`` (planned per volume) or the largest window shape: per axis, the fewest evenly spaced
            windows of at most that length that overlap by ``2 * halo`` (or the shortest ones the halo allows).
        max_window_voxels: the largest window for ``"auto"``.
        sw_batch_size: windows per forward pass.
        progress: show a progress bar over the windows.

    Raises:
        ValueError: (when called) the network has no ``receptive_radius`` and no `halo` was given, or `roi_size` is
            a string other than ``"auto"``.
    """

    def __init__(
        self,
        halo: int | None = None,
        roi_size: Sequence[int] | str = "auto",
        max_window_voxels: int = 2**22,
        sw_batch_size: int = 1,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.halo, self.roi_size, self.max_window_voxels = halo, roi_size, int(max_window_voxels)
        self.sw_batch_size, self.progress = int(sw_batch_size), bool(progress)

    def plan(self, spatial_size: Sequence[int], halo: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The window shape and per-axis overlap fractions for a volume of `spatial_size`."""
        size = [int(s) for s in spatial_size]
        if isinstance(self.roi_size, str):
            if self.roi_size != "auto":
                raise ValueError(f"roi_size must be 'auto' or a window shape, got {self.roi_size!r}")
            roi, overlap, _ = window_plan(size, halo, self.max_window_voxels)
            return roi, overlap
        roi, overlap = [], []
        for r, s in zip(self.roi_size, size):
            r = min(int(r), s) if int(r) > 0 else s
            options = _axis_options(s, halo)
            # the fewest evenly spaced windows of at most r voxels (else the shortest windows the halo allows)
            count, (length, step) = next((o for o in options if o[1][0] <= r), options[-1])
            roi.append(length)
            overlap.append(_overlap(length, step))
        return tuple(roi), tuple(overlap)

    def __call__(self, inputs: torch.Tensor, network, **kwargs):
        """
        Args:
            inputs: [B, C, *spatial].
            network: the fully convolutional network (same spatial size in and out).

        Returns:
            ``network(inputs)`` computed window by window, [B, C_out, *spatial] (a MetaTensor for a MetaTensor
            input), in the inputs' dtype.
        """
        # DistributedDataParallel (multi-GPU validation) wraps the network: its `module` has the radius
        halo = (
            self.halo
            if self.halo is not None
            else getattr(getattr(network, "module", network), "receptive_radius", None)
        )
        if halo is None:
            raise ValueError("HaloSlidingWindowInferer needs `halo` or a network with a `receptive_radius`")
        size = tuple(inputs.shape[2:])
        roi, overlap = self.plan(size, int(halo))
        weights = halo_weight_map(roi, size, int(halo)).to(inputs.device)
        return sliding_window_inference(
            inputs,
            roi,
            self.sw_batch_size,
            network,
            overlap=overlap,
            roi_weight_map=weights,
            progress=self.progress,
            **kwargs,
        )
