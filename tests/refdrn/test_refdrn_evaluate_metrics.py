"""The evaluation's custom pieces against references computed by hand: registration_metrics (folding, SDlogJ,
HD95/ASD in mm, global NCC, per-case values), the channel-mean PSNR, MONAI's Dice on label maps against the
bundle's joint-histogram Dice, and the identity baseline's network."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric

from tests.helpers import load_bundle_scripts

rm = load_bundle_scripts("refdrn", "registration_metrics")
evaluate = load_bundle_scripts("refdrn", "evaluate")
metrics = load_bundle_scripts("refdrn", "metrics")
checks = load_bundle_scripts("refdrn", "checks")
common = load_bundle_scripts("refdrn", "common")


def _grid(shape=(8, 9, 10)):
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


# ------------------------------------------------------------------------------------------ folding and SDlogJ
def test_folding_is_zero_for_the_identity_and_counts_folded_voxels():
    metric = rm.FoldingMetric()
    metric(torch.zeros(1, 3, 8, 8, 8))
    # u_0 = -2 x_0 mirrors axis 0: det J = 1 - 2 = -1 everywhere
    mirrored = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    mirrored[0, 0] = -2 * _grid((8, 8, 8))[0]
    metric(mirrored)
    # folded in the half x_0 >= 4 only: u_0 = -2 (x_0 - 4) there, so det = -1 from x_0 = 5 on (x_0 = 4 sits on the
    # kink: central difference (-2 + 0) / 2 gives det 0, which counts as folded)
    half = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    x0 = _grid((8, 8, 8))[0]
    half[0, 0] = torch.where(x0 >= 4, -2 * (x0 - 4), torch.zeros_like(x0))
    metric(half)
    assert metric.get_buffer()[:, 0].tolist() == [0.0, 100.0, 50.0]
    assert float(metric.aggregate()) == pytest.approx(50.0)


def test_sdlogj_is_the_std_of_the_log_jacobian_with_learn2reg_clipping():
    assert rm.sdlogj(torch.zeros(3, 8, 8, 8)) == 0.0
    # a uniform scaling has a constant Jacobian: SDlogJ 0
    assert rm.sdlogj(0.1 * _grid((8, 8, 8))) == pytest.approx(0.0, abs=1e-12)
    # u_0 = c x_0^2 / 2: det J = 1 + c x_0 inside (central differences are exact for quadratics); at the two
    # borders one-sided differences, as numpy's gradient
    c = 0.05
    ddf = torch.zeros(3, 10, 6, 6, dtype=torch.float64)
    ddf[0] = c * _grid((10, 6, 6))[0] ** 2 / 2
    det = 1 + np.gradient(ddf[0].numpy(), axis=0)
    assert np.allclose(det[1:-1], 1 + c * np.arange(10)[1:-1, None, None])
    assert rm.sdlogj(ddf) == pytest.approx(float(np.log(det).std()), rel=1e-12)  # np.std (ddof 0), as Learn2Reg
    # determinants <= 0 are clipped to 1e-9 before the log (Learn2Reg): a mirrored field has a constant log
    mirrored = torch.zeros(3, 8, 8, 8, dtype=torch.float64)
    mirrored[0] = -2 * _grid((8, 8, 8))[0]
    assert rm.sdlogj(mirrored) == pytest.approx(0.0, abs=1e-12)
    metric = rm.SDlogJMetric()
    metric([ddf, torch.zeros(3, 10, 6, 6)])  # a decollated list of per-case DDFs, as the evaluator passes them
    assert float(metric.aggregate()) == pytest.approx(rm.sdlogj(ddf) / 2)


# ---------------------------------------------------------------------------------------- HD95 and ASD in mm
def _slab_pair(shape=(12, 8, 8)):
    """Label maps: label 1 a one-voxel-thick slab at x_0 = 2 (prediction) and x_0 = 5 (reference), label 2 the
    same cube in both, label 3 only in the prediction, label 4 only in the reference."""
    pred, ref = torch.zeros(shape), torch.zeros(shape)
    pred[2], ref[5] = 1, 1
    pred[8:11, 2:5, 2:5], ref[8:11, 2:5, 2:5] = 2, 2
    pred[0, 0, 0] = 3
    ref[11, 7, 7] = 4
    return pred, ref


def test_hd95_and_asd_are_in_mm_from_the_reference_affine():
    pred, ref = _slab_pair()
    affine = torch.diag(torch.tensor([2.0, 0.5, 1.0, 1.0]))  # 2 mm along axis 0
    y = MetaTensor(ref[None, None], affine=affine)
    hd = rm.PhysicalHausdorffDistanceMetric(percentile=95, num_classes=5)
    asd = rm.PhysicalSurfaceDistanceMetric(symmetric=True, num_classes=5)
    hd_values = hd(pred[None, None], y)[0].tolist()
    asd_values = asd(pred[None, None], y)[0].tolist()
    # every slab voxel is 3 voxels = 6 mm from the other slab; the cube is unchanged
    for values in (hd_values, asd_values):
        assert values[:2] == [pytest.approx(6.0), 0.0]
        assert math.isnan(values[2])  # label 3 absent from the reference: left out
        assert math.isinf(values[3])  # label 4 lost by the prediction: MONAI's inf
    # a plain tensor has no affine: voxel units
    assert hd(pred[None, None], ref[None, None])[0, 0] == pytest.approx(3.0)


def test_label_map_input_matches_monai_on_one_hot_input():
    """The label-map path (cropped per label) gives MONAI's values on the full one-hot volumes."""
    rng = np.random.default_rng(0)
    ref = torch.as_tensor(rng.integers(0, 4, (1, 1, 14, 12, 10)), dtype=torch.float32)
    pred = ref.clone()
    pred[0, 0, 3:9, 2:8, 1:5] = torch.as_tensor(rng.integers(0, 4, (6, 6, 4)), dtype=torch.float32)
    assert all((pred == c).any() and (ref == c).any() for c in range(4))  # empty labels: see the test above
    one_hot = lambda x: torch.cat([x == c for c in range(4)], 1).float()  # noqa: E731
    spacing = [1.5, 1.0, 0.7]
    for cls, kwargs in (
        (rm.PhysicalHausdorffDistanceMetric, {"percentile": 95}),
        (rm.PhysicalSurfaceDistanceMetric, {"symmetric": True}),
    ):
        from_maps = cls(num_classes=4, **kwargs)(pred, ref, spacing=spacing)
        from_one_hot = cls(**kwargs)(one_hot(pred), one_hot(ref), spacing=spacing)
        monai_cls = cls.__mro__[1]
        reference = monai_cls(**kwargs)(one_hot(pred), one_hot(ref), spacing=spacing)
        assert torch.allclose(from_maps, reference, equal_nan=True)
        assert torch.allclose(from_one_hot, reference, equal_nan=True)


# ----------------------------------------------------------------------------------- NCC, values, PSNR, Dice
def test_global_ncc():
    a = torch.rand(2, 1, 6, 7, 8, dtype=torch.float64)
    metric = rm.GlobalNCCMetric()
    values = metric(a, torch.stack([2 * a[0] + 1, -a[1]]))
    assert values[:, 0].tolist() == [pytest.approx(1.0), pytest.approx(-1.0)]
    b = torch.rand(6, 7, 8, dtype=torch.float64)
    assert rm.global_ncc(a[0], b) == pytest.approx(np.corrcoef(a[0].flatten(), b.flatten())[0, 1])
    assert float(metric.aggregate()) == pytest.approx(0.0)


def test_per_case_value_metric_collects_batched_and_decollated_values():
    metric = common.PerCaseValueMetric()
    metric(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    metric([torch.tensor(6.0)], [torch.tensor(6.0)])
    assert metric.get_buffer()[:, 0].tolist() == [1.0, 2.0, 6.0]
    assert float(metric.aggregate()) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="one value per case"):
        metric(torch.zeros(1, 2))


def test_channel_mean_psnr_is_the_mean_of_the_per_image_psnrs():
    hr = torch.rand(1, 2, 8, 8, 8)
    noisy = (hr + 0.05 * torch.randn_like(hr)).clamp(0, 1)
    noisy[:, 1] = (hr[:, 1] + 0.2 * torch.randn_like(hr[:, 1])).clamp(0, 1)
    by_hand = [10 * math.log10(1 / float(((noisy[0, c] - hr[0, c]) ** 2).mean())) for c in range(2)]
    value = evaluate.ChannelMeanPSNRMetric(max_val=1.0)(noisy, hr)
    assert float(value) == pytest.approx(np.mean(by_hand), rel=1e-5)
    assert abs(np.mean(by_hand) - by_hand[0]) > 1  # the two images differ: a real average


def test_monai_dice_on_label_maps_equals_the_joint_histogram_dice():
    """evaluate.json's MeanDice (DiceMetric, num_classes, background excluded) is train.json's mean_label_dice:
    labels missing from the fixed map are left out, labels missing from the warped map count 0."""
    rng = np.random.default_rng(1)
    fixed = torch.as_tensor(rng.integers(0, 83, (1, 1, 20, 18, 16)), dtype=torch.float32)
    warped = fixed.clone()
    warped[0, 0, :10] = torch.as_tensor(rng.integers(0, 83, (10, 18, 16)), dtype=torch.float32)
    fixed[fixed == 7] = 0  # absent from the fixed map
    warped[warped == 9] = 0  # lost by the warped map
    dice = DiceMetric(include_background=False, num_classes=83)
    dice(warped, fixed)
    assert float(dice.aggregate()) == pytest.approx(metrics.mean_label_dice(warped, fixed), abs=1e-6)


# ------------------------------------------------------------------------------------- methods and case names
def test_identity_network_gives_a_zero_ddf_and_has_no_weights():
    net = evaluate.method_network("zero")
    pair = torch.rand(1, 2, 8, 8, 8)
    out = net(pair, return_dict=True)
    assert torch.equal(out["ddf"], torch.zeros(1, 3, 8, 8, 8))
    assert torch.equal(out["sr_moving"], pair[:, :1])  # no REM: the network input is the trilinear image
    assert not list(net.parameters()) and not net.state_dict()


def test_unknown_method_is_one_clear_error():
    assert evaluate.check_method("cascade", {"identity": {}, "cascade": {}}) == "cascade"
    with pytest.raises(checks.BundleInputError, match="unknown --method 'foo'; choose one of identity, cascade"):
        evaluate.check_method("foo", {"identity": {}, "cascade": {}})


def test_evaluate_step_rejects_labels_beyond_num_classes():
    label = MetaTensor(torch.full((1, 1, 2, 2, 2), 9.0), meta={"filename_or_obj": "lab.nii.gz"})
    step = evaluate.RegistrationEvaluateStep(num_classes=5)
    with pytest.raises(checks.BundleInputError, match="lab.nii.gz: label id 9 >= num_classes 5"):
        step.check_labels({"moving_label": label, "fixed_label": label})
