"""The fast inference paths keep the shipped models' quality (the CPU-speed issue's tolerances).

For each bundle, with its shipped weights, on synthetic volumes large enough to be split into several windows and
slabs, the path that `configs/inference.json` builds (REM window by window, the in-place / slab-wise networks,
``channels_last_3d``, bf16 autocast on a CPU with native bfloat16) is compared with the previous release's path
(float32, REM through Gaussian-blended 96³ windows in rem_sr and on the whole volume in refdrn, the whole-volume
decoder):

- rem_sr: PSNR in the brain within 0.05 dB;
- refdrn and f3rnet_ct_mri: mean label Dice within 0.002, folding (% of voxels with det J <= 0) within 0.01
  percentage points, SDlogJ within 0.01.

The real-data figures (the test brain, the four brain pairs, the phantom pairs) are in the model cards, from
``make benchmark``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.networks.blocks import Warp

from tests.helpers import BUNDLES, load_bundle_scripts, synthetic_brain, synthetic_labels


def _fast_path(bundle: str, **overrides):
    """The network and inferer exactly as the bundle's inference.json builds them (no weights loaded yet)."""
    load_bundle_scripts(bundle, "fast_inference")  # `scripts` = this bundle's package
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser.get_parsed_content("network"), parser.get_parsed_content("inferer")


def _load(network: torch.nn.Module, bundle: str) -> torch.nn.Module:
    state = torch.load(BUNDLES / bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def _down_up(image: np.ndarray, factor: int = 4) -> torch.Tensor:
    """×`factor` down (area) and trilinear up: the LR input on the HR grid, [1, 1, D, H, W]."""
    x = torch.from_numpy(image)[None, None]
    lr = F.avg_pool3d(x, factor)
    return F.interpolate(lr, size=x.shape[2:], mode="trilinear", align_corners=False)


def _psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    mse = ((a.clamp(0, 1) - b)[mask] ** 2).mean()
    return float(10 * torch.log10(1.0 / mse))


def _registration_quality(ddf: torch.Tensor, moving_label: torch.Tensor, fixed_label: torch.Tensor) -> dict:
    rm = load_bundle_scripts("refdrn", "registration_metrics")
    warped = Warp(mode="nearest", padding_mode="zeros")(moving_label[None, None].float(), ddf)[0, 0]
    ids = [int(i) for i in torch.unique(fixed_label) if i > 0]
    dice = [
        float(2 * ((warped == i) & (fixed_label == i)).sum() / ((warped == i).sum() + (fixed_label == i).sum()))
        for i in ids
    ]
    return {"dice": float(np.mean(dice)), "folding": rm.folding_percent(ddf[0]), "sdlogj": rm.sdlogj(ddf[0])}


def _assert_registration_unchanged(before: dict, after: dict) -> None:
    assert abs(after["dice"] - before["dice"]) <= 0.002, (before, after)
    assert abs(after["folding"] - before["folding"]) <= 0.01, (before, after)
    assert abs(after["sdlogj"] - before["sdlogj"]) <= 0.01, (before, after)


def test_rem_sr_fast_path_keeps_psnr():
    hr, mask = synthetic_brain((96, 112, 96), seed=3)
    hr_t, mask_t = torch.from_numpy(hr)[None, None], torch.from_numpy(mask.astype(bool))[None, None]
    lr_up = _down_up(hr)
    # windows of at most 48^3 voxels: the volume is split along every axis
    network, inferer = _fast_path("rem_sr", max_window_voxels=48**3)
    fast = inferer(lr_up, _load(network, "rem_sr"))
    previous = _load(load_bundle_scripts("rem_sr", "networks").REM(), "rem_sr")
    with torch.no_grad():
        before = SlidingWindowInferer((96, 96, 96), overlap=0.25, mode="gaussian")(lr_up, previous)
        whole = previous(lr_up)
    psnr_before, psnr_after = _psnr(before, hr_t, mask_t), _psnr(fast, hr_t, mask_t)
    assert psnr_before > _psnr(lr_up, hr_t, mask_t)  # the shipped REM does improve on trilinear here
    assert abs(psnr_after - psnr_before) <= 0.05, (psnr_before, psnr_after)
    # float32 windows are the whole-volume result
    network32, inferer32 = _fast_path("rem_sr", max_window_voxels=48**3, precision="fp32")
    windows32 = inferer32(lr_up, _load(network32, "rem_sr"))
    assert (windows32 - whole).abs().max() < 1e-5 * whole.abs().max()


def test_refdrn_fast_path_keeps_dice_and_folding():
    fixed, fixed_label = synthetic_labels((96, 112, 96), seed=0)
    moving, moving_label = synthetic_labels((96, 112, 96), seed=5)
    pair = torch.cat([_down_up(moving), _down_up(fixed)], dim=1)
    network, inferer = _fast_path("refdrn", rem_max_window_voxels=40**3)
    fast = inferer(pair, _load(network, "refdrn"))

    networks, rem_loader = load_bundle_scripts("refdrn", "networks"), load_bundle_scripts("refdrn", "rem_loader")
    previous = _load(networks.build_registration_network(rem=rem_loader.load_rem(str(BUNDLES / "rem_sr"))), "refdrn")
    previous.backbone.inference_slab = 10**9  # the whole-volume decoder
    with torch.no_grad():
        before = previous(pair)
    labels = torch.from_numpy(moving_label), torch.from_numpy(fixed_label)
    quality_before, quality_after = _registration_quality(before, *labels), _registration_quality(fast, *labels)
    identity = _registration_quality(torch.zeros_like(before), *labels)
    assert quality_before["dice"] > identity["dice"]  # the shipped network registers this pair
    _assert_registration_unchanged(quality_before, quality_after)


def test_f3rnet_fast_path_keeps_dice_and_folding():
    phantoms = pytest.importorskip("tools.make_abdomen_phantoms")
    subject = phantoms.make_subject(np.random.default_rng(7), shape=(96, 96, 80))
    ct = torch.from_numpy(np.clip((subject["ct"] + 300) / 800, 0, 1))
    mr = torch.from_numpy(subject["mr"] / np.percentile(subject["mr"], 99))
    pair = torch.stack([ct, mr])[None].float()
    network, inferer = _fast_path("f3rnet_ct_mri")
    fast = inferer(pair, _load(network, "f3rnet_ct_mri"))

    load_bundle_scripts("f3rnet_ct_mri", "fast_inference")
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "f3rnet_ct_mri" / "configs" / "inference.json"))
    previous = _load(parser.get_parsed_content("network_def"), "f3rnet_ct_mri")
    with torch.no_grad():
        before = previous(pair)
    labels = torch.from_numpy(subject["ct_label"]), torch.from_numpy(subject["mr_label"])
    quality_before, quality_after = _registration_quality(before, *labels), _registration_quality(fast, *labels)
    identity = _registration_quality(torch.zeros_like(before), *labels)
    assert quality_before["dice"] > identity["dice"]
    _assert_registration_unchanged(quality_before, quality_after)
