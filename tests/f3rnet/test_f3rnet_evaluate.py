"""The f3rnet_ct_mri evaluation (configs/evaluate.json over train.json): its pieces in scripts/evaluate.py, and the
configured metrics against hand computations on a toy pair with anisotropic voxels (2 x 1 x 3 mm), run
in-process through `monai.bundle.run` (the function behind `python -m monai.bundle run`)."""

from __future__ import annotations

import csv
import importlib
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from tests.f3rnet.bundle_import import BUNDLE_ROOT, load_f3rnet

torch.set_num_threads(1)

evaluate = load_f3rnet("evaluate")
registration_metrics = importlib.import_module("scripts.registration_metrics")
common = importlib.import_module("scripts.common")

SPACING = (2.0, 1.0, 3.0)
SHAPE = (16, 20, 16)
# the organs of the fixed label by id (label 3 is the patient's right kidney, as in Learn2Reg and the phantoms)
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
# each organ once per measure, after the measure's mean over organs; no group (the two kidneys) and no repeat
METRICS = [
    "dice",
    *[f"dice_{o}" for o in ORGANS.values()],
    "asd",
    *[f"asd_{o}" for o in ORGANS.values()],
    "hd95",
    *[f"hd95_{o}" for o in ORGANS.values()],
    "folding_percent",
    "sdlogj",
    "seconds",
]
# label id -> (box in the fixed label, box in the moving label); organ 3 does not move
BOXES = {
    1: ((slice(3, 9), slice(3, 12), slice(3, 9)), (slice(4, 10), slice(3, 12), slice(3, 10))),
    2: ((slice(10, 14), slice(3, 8), slice(4, 8)), (slice(10, 14), slice(4, 9), slice(4, 8))),
    3: ((slice(3, 7), slice(14, 18), slice(10, 14)), (slice(3, 7), slice(14, 18), slice(10, 14))),
    4: ((slice(9, 13), slice(13, 18), slice(10, 14)), (slice(9, 12), slice(13, 17), slice(11, 14))),
}


# ---------------------------------------------------------------------------------------------- the pieces
def test_zero_ddf_is_the_identity_method_and_unknown_methods_are_rejected():
    pair = torch.rand(2, 2, 5, 6, 7)
    ddf = evaluate.ZeroDDF()(pair)
    assert ddf.shape == (2, 3, 5, 6, 7) and not ddf.any() and ddf.dtype == pair.dtype
    assert not list(evaluate.ZeroDDF().parameters())
    methods = {"identity": None, "none": "model.pt", "all": "model_all.pt"}
    assert evaluate.check_method("all", methods) == "all"
    with pytest.raises(evaluate.BundleInputError, match="method must be one of identity, none, all, got 'ncc'"):
        evaluate.check_method("ncc", methods)


def test_organ_channels_keep_the_organ_label_ids_and_the_metadata():
    affine = torch.diag(torch.tensor(SPACING + (1.0,)))
    pred = MetaTensor(torch.arange(5.0)[:, None, None, None].expand(5, 2, 2, 2), affine=affine)
    label = pred + 10
    transform = evaluate.organ_channels(["p", "l"], [3, 4])
    p, lab = transform([{"p": pred, "l": label}])  # decollated: lists of [C, X, Y, Z]
    assert p[0][:, 0, 0, 0].tolist() == [3.0, 4.0] and lab[0][:, 0, 0, 0].tolist() == [13.0, 14.0]
    assert torch.equal(lab[0].affine, label.affine)
    p, lab = transform({"p": pred[None], "l": label[None]})  # batch-first
    assert p.shape == (1, 2, 2, 2, 2) and lab[0, :, 0, 0, 0].tolist() == [13.0, 14.0]


def test_seconds_are_collected_per_pair_as_configured():
    """The `seconds` handler: the step's [B, 1] output, decollated into one [1] tensor per pair."""
    metric = common.PerCaseValueMetric()
    step_output = {"seconds": torch.tensor([[0.5], [1.5]], dtype=torch.float64)}
    decollated = [{"seconds": s} for s in step_output["seconds"]]
    metric(*_config_output_transform("seconds")(decollated))
    metric(*_config_output_transform("seconds")([{"seconds": torch.tensor([4.0])}]))
    assert metric.get_buffer().flatten().tolist() == [0.5, 1.5, 4.0]
    assert float(metric.aggregate()) == pytest.approx(2.0)


def _config_output_transform(metric: str):
    """The output_transform of one metric handler of evaluate.json, parsed by MONAI's ConfigParser."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", "evaluate.json")])
    return parser.get_parsed_content(f"evaluate#additional_metrics#{metric}#output_transform")


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, pair):
        self.calls += 1
        return pair.new_ones((pair.shape[0], 3, *pair.shape[2:]))


@pytest.mark.parametrize("warmup", [True, "false"])
def test_evaluate_step_warms_up_once_then_times_every_forward(warmup):
    net = _Counting()
    events = []
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu"), output=None),
        network=net,
        inferer=SimpleInferer(),
        amp=False,
        fire_event=events.append,
    )
    affine = torch.diag(torch.tensor(SPACING + (1.0,)))
    fixed = MetaTensor(torch.rand(1, 1, 16, 16, 16), affine=affine[None])
    fixed.is_batch = True
    batch = {"moving_image": torch.rand(1, 1, 16, 16, 16), "fixed_image": fixed}
    step = evaluate.F3RNetEvaluateStep(warmup=warmup)
    for _ in range(2):
        out = step(engine, batch)
    assert net.calls == (3 if warmup is True else 2)  # one warm-up forward, then one timed forward per batch
    assert len(events) == 4  # FORWARD_COMPLETED and MODEL_COMPLETED per batch, for MONAI's postprocessing
    assert out["pred"].shape == (1, 3, 16, 16, 16) and out["pred"].device.type == "cpu"
    assert torch.allclose(out["pred"].affine.reshape(-1, 4, 4)[0].float(), affine)
    assert out["seconds"].shape == (1, 1) and 0 < float(out["seconds"]) < 5
    with pytest.raises(evaluate.BundleInputError, match="warmup must be true or false"):
        evaluate.F3RNetEvaluateStep(warmup="maybe")


# ------------------------------------------------------------------------- the configured evaluation, in mm
def _toy_pair(root):
    rng = np.random.default_rng(0)
    affine = np.diag([*SPACING, 1.0])
    fixed, moving = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for label_id, (f_box, m_box) in BOXES.items():
        fixed[f_box], moving[m_box] = label_id, label_id
    root.mkdir(parents=True, exist_ok=True)
    volumes = {
        "fixed.nii.gz": rng.random(SHAPE, np.float32),
        "moving.nii.gz": rng.random(SHAPE, np.float32),
        "fixed_label.nii.gz": fixed,
        "moving_label.nii.gz": moving,
    }
    for name, data in volumes.items():
        nib.save(nib.Nifti1Image(data, affine), str(root / name))
    item = {
        "name": "toy_pair",
        "fixed_image": "fixed.nii.gz",
        "moving_image": "moving.nii.gz",
        "fixed_label": "fixed_label.nii.gz",
        "moving_label": "moving_label.nii.gz",
    }
    (root / "datalist.json").write_text(json.dumps({"test": [item]}))
    return root, fixed, moving


def _evaluate(data_root, output_dir, **overrides):
    from monai.bundle import run

    load_f3rnet("checks")  # this bundle's `scripts` package first on sys.path, other bundles' purged
    run(
        config_file=[str(BUNDLE_ROOT / "configs" / c) for c in ("train.json", "evaluate.json")],
        bundle_root=str(BUNDLE_ROOT),
        logging_file=False,
        dataset_dir=str(data_root),
        datalist=str(data_root / "datalist.json"),
        output_dir=str(output_dir),
        fr_channels=4,
        ms_channels=8,
        **overrides,
    )
    return {row[0]: float(row[1]) for row in csv.reader((output_dir / "metrics.csv").read_text().splitlines())}


def _edge_distances_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances (mm) from each surface voxel of mask `a` to the nearest surface voxel of mask `b`."""
    surface = lambda m: np.argwhere(m & ~binary_erosion(m)) * np.array(SPACING)  # noqa: E731
    return cdist(surface(a), surface(b)).min(axis=1)


def test_identity_metrics_match_hand_computed_dice_asd_and_hd95_in_mm(tmp_path):
    root, fixed, moving = _toy_pair(tmp_path / "toy")
    got = _evaluate(root, tmp_path / "eval", method="identity")
    assert list(got) == METRICS  # every configured metric reached metrics.csv
    dice, asd, hd95 = {}, {}, {}
    for label_id in BOXES:
        f, m = fixed == label_id, moving == label_id
        dice[label_id] = 2 * (f & m).sum() / (f.sum() + m.sum())
        d_mf, d_fm = _edge_distances_mm(m, f), _edge_distances_mm(f, m)
        asd[label_id] = np.concatenate([d_mf, d_fm]).mean()
        hd95[label_id] = max(np.percentile(d_mf, 95), np.percentile(d_fm, 95))
    assert dice[3] == 1 and asd[3] == 0 and 0 < dice[1] < 1 and asd[1] > 1  # the toy is not trivial
    assert dice[4] < 1 and len({round(float(v), 6) for v in dice.values()}) == 4  # every organ has its own value
    expected = {
        "dice": np.mean(list(dice.values())),
        "asd": np.mean(list(asd.values())),
        "hd95": np.mean(list(hd95.values())),
        "folding_percent": 0.0,
        "sdlogj": 0.0,
    }
    for label_id, organ in ORGANS.items():
        expected |= {f"dice_{organ}": dice[label_id], f"asd_{organ}": asd[label_id], f"hd95_{organ}": hd95[label_id]}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert 0 <= got["seconds"] < 1
    # per-pair, per-organ details (MetricsSaver's <metric>_raw.csv), named by the datalist item
    rows = list(csv.DictReader((tmp_path / "eval" / "asd_raw.csv").read_text().splitlines()))
    assert [r["filename"] for r in rows] == ["toy_pair"]
    assert [float(rows[0][f"class{i}"]) for i in range(4)] == pytest.approx([asd[i] for i in (1, 2, 3, 4)], rel=1e-5)
    summary = list(csv.DictReader((tmp_path / "eval" / "dice_kidney_left_summary.csv").read_text().splitlines()))
    assert summary[-1]["class"] == "mean"
    assert float(summary[-1]["mean"]) == pytest.approx(expected["dice_kidney_left"], abs=1e-4)
    assert (tmp_path / "eval" / "registration_identity_ct2mri.png").stat().st_size > 10_000
    assert not list((tmp_path / "eval").glob(".partial-*"))


class KnownDDF(torch.nn.Module):
    """A test network: u_0 = c(k) * i with c = -2 on the first half of the last axis (det J = -1, folded) and 0.5
    on the second half (det J = 1.5)."""

    def forward(self, pair):
        _, _, nx, _, nz = pair.shape
        ddf = pair.new_zeros((pair.shape[0], 3, *pair.shape[2:]))
        c = torch.where(torch.arange(nz) < nz // 2, -2.0, 0.5)
        ddf[:, 0] = torch.arange(nx, dtype=pair.dtype)[:, None, None] * c[None, None, :]
        return ddf


@pytest.mark.filterwarnings("ignore")  # the field moves labels out of the volume: empty-mask warnings
def test_folding_and_sdlogj_of_a_known_field(tmp_path):
    root, _, _ = _toy_pair(tmp_path / "toy")
    got = _evaluate(
        root, tmp_path / "eval", method="identity", network={"_target_": "tests.f3rnet.test_f3rnet_evaluate.KnownDDF"}
    )
    assert got["folding_percent"] == pytest.approx(50.0)
    det = np.where(np.arange(SHAPE[2]) < SHAPE[2] // 2, -1.0, 1.5)[None, None, :] * np.ones(SHAPE)
    # Learn2Reg's SDlogJ: std of log(det J), determinants clipped to [1e-9, 1e9]
    assert got["sdlogj"] == pytest.approx(np.log(np.clip(det, 1e-9, 1e9)).std(), rel=1e-3)
