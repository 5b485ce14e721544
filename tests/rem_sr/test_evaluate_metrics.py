"""rem_sr's evaluation pieces MONAI lacks (scripts/evaluate.py) against references computed by hand, and the
per-method settings of evaluate.json, checked by parsing the config (no engine run)."""

import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from tests.helpers import BUNDLES, load_bundle_scripts

evaluate = load_bundle_scripts("rem_sr", "evaluate")
degradation = load_bundle_scripts("rem_sr", "degradation")
networks = load_bundle_scripts("rem_sr", "networks")
common = load_bundle_scripts("rem_sr", "common")


def _volumes(shape=(24, 26, 22), seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0, 1, shape).astype(np.float32)
    pred = np.clip(ref + rng.normal(0, 0.1, shape), 0, 1).astype(np.float32)
    return pred, ref


def _batch(*arrays):
    """numpy [D, H, W] arrays -> one [1, C, D, H, W] tensor (C = number of arrays)."""
    return torch.from_numpy(np.stack(arrays)[None].astype(np.float32))


def test_masked_psnr_is_psnr_over_the_masked_voxels_by_hand():
    pred, ref = _volumes()
    mask = np.zeros(pred.shape, np.float32)
    mask[4:15, 6:20, 3:12] = 1
    pred[mask == 0] = 0.0  # errors outside the mask must not count
    metric = evaluate.MaskedPSNRMetric(max_val=1.0)
    value = metric(_batch(pred), _batch(ref, mask))
    sel = mask > 0
    mse = np.mean((pred[sel].astype(np.float64) - ref[sel]) ** 2)
    assert value.shape == (1, 1)
    assert float(value) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-4)
    # and it differs from the whole-volume PSNR
    whole = 10 * math.log10(1.0 / np.mean((pred.astype(np.float64) - ref) ** 2))
    assert abs(float(value) - whole) > 1.0


def _ssim_at(pred, ref, centre, win=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    """The SSIM of one Gaussian window centred at `centre` (Wang et al.'s formula, float64, by hand)."""
    d = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    g /= g.sum()
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    h = win // 2
    window = tuple(slice(c - h, c + h + 1) for c in centre)
    x, y = pred[window].astype(np.float64), ref[window].astype(np.float64)
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_masked_ssim_averages_the_windows_centred_in_the_mask_by_hand():
    pred, ref = _volumes()
    centres = [(8, 9, 7), (14, 15, 12), (12, 10, 10)]
    mask = np.zeros(pred.shape, np.float32)
    for c in centres:
        mask[c] = 1
    mask[0, 0, 0] = 1  # no valid window is centred here: must be ignored
    value = evaluate.MaskedSSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5)(
        _batch(pred), _batch(ref, mask)
    )
    expected = np.mean([_ssim_at(pred, ref, c) for c in centres])
    assert float(value) == pytest.approx(expected, abs=1e-5)


def test_masked_ssim_with_a_full_mask_is_monai_whole_volume_ssim():
    from monai.metrics import SSIMMetric

    pred, ref = _volumes(seed=1)
    full = np.ones(pred.shape, np.float32)
    masked = evaluate.MaskedSSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5)(
        _batch(pred), _batch(ref, full)
    )
    whole = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5)(_batch(pred), _batch(ref))
    assert float(masked) == pytest.approx(float(whole), abs=1e-6)


def test_masked_metrics_are_nan_without_a_mask_and_aggregate_skips_nan():
    pred, ref = _volumes()
    mask = np.ones(pred.shape, np.float32)
    for cls in (evaluate.MaskedPSNRMetric, evaluate.MaskedSSIMMetric):
        metric = cls()
        # the engine passes decollated lists of channel-first tensors: one case with a mask, one without
        metric([_batch(pred)[0], _batch(pred)[0]], [_batch(ref, mask)[0], _batch(ref)[0]])
        per_case = metric.get_buffer()
        assert per_case.shape == (2, 1)
        assert math.isfinite(float(per_case[0])) and math.isnan(float(per_case[1]))
        assert float(metric.aggregate()) == pytest.approx(float(per_case[0]))


def test_masked_metrics_reject_wrong_shapes():
    with pytest.raises(ValueError, match="expected y_pred"):
        evaluate.MaskedPSNRMetric()(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="need the reference"):
        evaluate.MaskedSSIMMetric()(torch.rand(1, 1, 16, 16, 16))


def test_forward_seconds_metric_reads_the_times():
    metric = common.PerCaseValueMetric()
    metric([torch.tensor(0.5), torch.tensor(1.5)], [torch.tensor(0.5), torch.tensor(1.5)])
    assert metric.get_buffer().flatten().tolist() == [0.5, 1.5]
    assert float(metric.aggregate()) == pytest.approx(1.0)


def test_degraded_upsamples_with_the_requested_method():
    hr = MetaTensor(torch.rand(1, 20, 24, 16), meta={"filename_or_obj": "hr.nii.gz"})
    for method in ("nearest", "trilinear", "bspline"):
        out = degradation.Degraded(keys="label", scale=4, out_key="image", method=method)({"label": hr})
        assert torch.equal(out["image"].as_tensor(), degradation.degrade(hr, 4, method))
        assert out["image"].meta["filename_or_obj"] == "hr.nii.gz" and out["scale"] == 4.0
    default = degradation.Degraded(keys="label", scale=2)({"label": hr})
    assert torch.equal(default["lr"].as_tensor(), degradation.degrade(hr, 2, "trilinear"))
    with pytest.raises(ValueError, match="unknown interpolation method"):
        degradation.Degraded(keys="label", scale=2, method="cubic")


# ------------------------------------------------------------------------------------------ evaluate.json
def parsed_evaluate_item(item_id: str, **overrides):
    """One parsed item of train.json + evaluate.json, with the bundle's own error (not the parser's wrapper)."""
    checks = load_bundle_scripts("rem_sr", "checks")
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "rem_sr" / "configs" / f) for f in ("train.json", "evaluate.json")])
    parser.update({"bundle_root": str(BUNDLES / "rem_sr"), "device": "$torch.device('cpu')", **overrides})
    parser.parse()
    try:
        return parser.get_parsed_content(item_id)
    except Exception as e:  # the parser wraps the callable's error
        while e.__cause__ is not None and not isinstance(e, checks.BundleInputError):
            e = e.__cause__
        raise e


def test_every_compared_method_resolves_to_its_network_weights_and_upsampling():
    methods = parsed_evaluate_item("compare_methods")
    assert methods == ["nearest", "trilinear", "bspline", "rem_general", "rem"]
    assert parsed_evaluate_item("compare_grid") == {"eval_scale": [2, 4, [1, 1, 4]]}  # x2, x4, 4 mm thick slices
    assert parsed_evaluate_item("method") == "rem" and parsed_evaluate_item("eval_scale") == 4
    for method in methods:
        network = parsed_evaluate_item("network", method=method)
        ckpt = parsed_evaluate_item("ckpt_path", method=method)
        upsampling = parsed_evaluate_item("upsampling", method=method)
        if method.startswith("rem"):
            # by name: other test files in this worker may have re-imported the bundle's `scripts` package
            assert type(network).__name__ == "REM" and type(network).__module__ == "scripts.networks"
            assert ckpt.endswith("models/model.pt")  # x4: no file of its own, the one model
            for scale, weights in ((2, "model_x2.pt"), ([1, 1, 4], "model.pt"), ([1, 2, 2], "model.pt")):
                expected = weights if method == "rem" else "model.pt"
                assert parsed_evaluate_item("ckpt_path", method=method, eval_scale=scale).endswith(expected)
            assert upsampling == "trilinear"
        else:
            assert isinstance(network, torch.nn.Identity) and ckpt is None and upsampling == method
        assert parsed_evaluate_item("output_dir", method=method).endswith(f"eval/{method}_x4")


def test_unknown_method_is_rejected_clearly():
    checks = load_bundle_scripts("rem_sr", "checks")
    with pytest.raises(checks.BundleInputError, match="method must be one of nearest, trilinear, bspline, rem_general"):
        parsed_evaluate_item("run#0", method="bicubic")  # the first entry of `run`, before anything is built
