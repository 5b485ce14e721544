"""The shared fast-inference helpers (scripts/fast_inference.py) and the in-place / slab-wise network paths.

Each fast path must give the result of the plain path: windows against the whole volume, slabs against the
whole decoder stage, in-place activations against the functional reference, the float32 DDF head against a
float32 convolution.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from tests.helpers import load_bundle_scripts

fi = load_bundle_scripts("rem_sr", "fast_inference")
common = load_bundle_scripts("rem_sr", "common")
rem_networks = load_bundle_scripts("rem_sr", "networks")


def _rem(k=4, n=3, variant="I", seed=0):
    torch.manual_seed(seed)
    net = rem_networks.REM(k=k, n=n, variant=variant).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("size", [(64, 80, 72), (160, 208, 176), (33, 90, 47), (256, 256, 256)])
@pytest.mark.parametrize("budget", [30**3, 2**21, 2**22])
def test_window_plan_places_the_windows_monai_uses(size, budget):
    halo = 10
    roi, overlap, processed = fi.window_plan(size, halo, budget)
    slices = dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, overlap))
    assert processed == len(slices) * math.prod(roi)
    for axis in range(3):
        starts = sorted({s[axis].start for s in slices})
        ends = sorted({s[axis].stop for s in slices})
        assert starts[0] == 0 and ends[-1] == size[axis]
        steps = {b - a for a, b in zip(starts, starts[1:])}
        assert len(steps) <= 1  # evenly spaced
        if len(starts) > 1:
            step = steps.pop()
            assert roi[axis] - step >= 2 * halo  # every voxel lies `halo` inside some window
            assert step >= halo  # only the end windows reach the volume's faces' halo
    # the chosen window fits the budget whenever any plan does (a 30^3 budget cannot split these volumes that fine)
    assert math.prod(roi) <= budget or budget == 30**3


def test_window_plan_prefers_few_processed_voxels():
    roi, _, processed = fi.window_plan((160, 208, 176), 10, 2**22)
    assert math.prod(roi) <= 2**22
    assert processed / (160 * 208 * 176) < 1.12
    roi, _, processed = fi.window_plan((128, 128, 128), 10, 2**22)
    assert roi == (128, 128, 128) and processed == 128**3


@pytest.mark.parametrize("variant", ["I", "II", "III"])
@pytest.mark.parametrize("budget", [24**3, 30 * 40 * 20, 10**9])
def test_halo_windows_give_the_full_volume_result(variant, budget):
    net = _rem(variant=variant)
    x = torch.rand(2, 1, 37, 52, 29)
    with torch.no_grad():
        full = net(x)
        windows = fi.HaloSlidingWindowInferer(max_window_voxels=budget)(x, net)
        naive = sliding_window_inference(x, (24, 24, 24), 1, net, overlap=0.25, mode="gaussian")
    assert windows.shape == full.shape
    assert (windows - full).abs().max() < 1e-5 * full.abs().max()  # float rounding only
    assert (naive - full).abs().max() > 1e-3  # plain Gaussian-blended windows differ: the test can fail


def test_halo_windows_with_an_explicit_roi_and_a_metatensor():
    net = _rem()
    x = MetaTensor(torch.rand(1, 1, 40, 44, 36), meta={"filename_or_obj": "case.nii.gz"})
    with torch.no_grad():
        full = net(x.as_tensor())
        out = fi.HaloSlidingWindowInferer(roi_size=[20, -1, 25])(x, net)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.nii.gz"
    assert (out.as_tensor() - full).abs().max() < 1e-5 * full.abs().max()
    roi, _ = fi.HaloSlidingWindowInferer(roi_size=[20, -1, 25]).plan((40, 44, 36), net.receptive_radius)
    assert roi[1] == 44 and roi[0] <= 40


def test_halo_windows_need_a_receptive_radius():
    with pytest.raises(ValueError, match="receptive_radius"):
        fi.HaloSlidingWindowInferer()(torch.rand(1, 1, 8, 8, 8), torch.nn.Identity())


@pytest.mark.parametrize("variant", ["I", "II", "III"])
def test_rem_in_place_activations_match_the_functional_reference(variant):
    net = _rem(variant=variant)
    x = torch.rand(1, 1, 12, 14, 10, requires_grad=True)
    first = F.relu(net.head(x))
    h = first
    for conv in net.body:
        h = h + F.relu(conv(h)) if variant == "III" else F.relu(conv(h))
    if variant == "II":
        h = h + first
    reference = net.tail(h) + (x if variant == "I" else 0)
    out = net(x)
    assert torch.equal(out, reference)
    out.sum().backward()  # in-place ReLU keeps autograd working (REM is trained, and frozen in refdrn's loss)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_float32_conv_gives_a_float32_head_under_autocast():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 3, 3, padding=1)
    h = torch.randn(1, 8, 37, 10, 9)
    assert torch.equal(fi.float32_conv(conv, h), conv(h))  # no autocast: the plain convolution
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hb = h.bfloat16()
        whole = fi.float32_conv(conv, hb, slab=10**6)
        slabs = fi.float32_conv(conv, hb, slab=5)
        plain = conv(hb)
    assert whole.dtype == slabs.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert torch.allclose(slabs, whole, atol=1e-6)
    assert torch.allclose(whole, conv(hb.float()), atol=1e-6)


def test_autocast_dtype_and_precision_names(monkeypatch):
    assert fi.autocast_dtype("fp32") is None
    assert fi.autocast_dtype("BF16") is torch.bfloat16
    assert fi.autocast_dtype("auto", "cuda") is None  # CUDA: the amp flag governs
    monkeypatch.setattr(fi, "cpu_has_native_bf16", lambda: True)
    assert fi.autocast_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(fi, "cpu_has_native_bf16", lambda: False)
    assert fi.autocast_dtype("auto") is None
    with pytest.raises(common.BundleInputError, match="--precision must be one of auto, fp32, bf16"):
        fi.autocast_dtype("half")
    with pytest.raises(common.BundleInputError, match="--precision"):
        fi.InferenceModeInferer(precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_mode_inferer_returns_ordinary_float32_tensors(precision):
    net = _rem()
    x = MetaTensor(torch.rand(1, 1, 16, 16, 16), meta={"filename_or_obj": "a.nii.gz"})
    inferer = fi.InferenceModeInferer(fi.HaloSlidingWindowInferer(), precision=precision)
    out = inferer(x, net)
    assert out.dtype == torch.float32 and not out.is_inference() and not out.requires_grad
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.nii.gz"
    out.add_(1.0)  # postprocessing may change it in place
    with torch.no_grad():
        reference = net(x.as_tensor())
    tolerance = 1e-6 if precision == "fp32" else 0.02
    assert (out.as_tensor() - 1.0 - reference).abs().max() < tolerance * reference.abs().max() + 1e-6

    dict_net = torch.nn.Module()
    dict_net.forward = lambda t: {"a": t * 2, "b": (t.long(),)}
    out = fi.InferenceModeInferer(precision=precision)(torch.ones(1, 1, 2, 2, 2), dict_net)
    assert not out["a"].is_inference() and out["b"][0].dtype == torch.int64


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert fi.set_threads(None) == before
        assert fi.set_threads("null") == before
        assert fi.set_threads(1) == 1
        assert fi.set_threads("2") == 2
        for bad in (0, -1, "x", 1.5, "2.0"):
            with pytest.raises(common.BundleInputError, match="--threads must be a positive integer"):
                fi.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_background_writer_writes_atomically_and_reports_errors(tmp_path):
    from monai.transforms import SaveImage

    image = MetaTensor(torch.rand(1, 6, 7, 8), meta={"filename_or_obj": "case.nii.gz"})
    saver = SaveImage(
        output_dir=str(tmp_path), output_postfix="x", separate_folder=False, writer=common.BackgroundNibabelWriter
    )
    saver(image)
    common.wait_for_writes()
    assert (tmp_path / "case_x.nii.gz").is_file()
    assert not list(tmp_path.glob(".partial-*"))

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    common.write_in_background(common.atomic_write_bytes, blocked / "sub" / "f.bin", b"123")
    with pytest.raises(OSError):
        common.wait_for_writes()
    common.wait_for_writes()  # the error was reported once; nothing is pending


def test_fdrn_slab_decoder_matches_the_whole_volume_decoder():
    networks = load_bundle_scripts("refdrn", "networks")
    torch.manual_seed(0)
    net = networks.FDRN(return_aux=True).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.03)
    x = torch.rand(1, 2, 70, 60, 50)
    with torch.no_grad():
        net.inference_slab = 10**6
        whole, aux = net(x)
        for slab in (7, 32):
            net.inference_slab = slab
            sliced, aux_sliced = net(x)
            assert (sliced - whole).abs().max() < 1e-5 * whole.abs().max()
            assert torch.equal(aux, aux_sliced)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(x)[0]
    assert bf16.dtype == torch.float32  # the DDF head stays float32
    net.train()
    ddf, aux = net(x[..., :32, :32, :32])  # with gradients: the whole-volume path, in-place activations allowed
    (ddf.square().mean() + aux.square().mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
