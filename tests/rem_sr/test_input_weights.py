"""rem_sr's REM weights per kind of input: the classification, the evaluation's choice and, through MONAI's bundle
runner, inference choosing the weights per case (and the same output as the chosen weights given explicitly)."""

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import BUNDLES, load_bundle_scripts, run_bundle, synthetic_brain

input_weights = load_bundle_scripts("rem_sr", "input_weights")


@pytest.mark.parametrize(
    "zoom, kind",
    [
        ([2, 2, 2], "x2"),
        ([4, 4, 4], "x4"),
        ([1, 1, 4], "thick"),
        ([5, 1, 1], "thick"),
        ([1, 1, 1], "default"),
        ([1, 2, 2], "default"),
        ([2, 2, 4], "default"),
        ([2.5, 2.5, 2.5], "x2"),
        ([3, 3, 3], "x4"),
    ],
)
def test_degradation_kind(zoom, kind):
    assert input_weights.degradation_kind(zoom) == kind


def test_weights_for_scale_falls_back_to_the_default():
    weights = {"default": "m.pt", "x2": "m2.pt", "x4": "m4.pt", "thick": "mt.pt"}
    assert input_weights.weights_for_scale(2, weights) == "m2.pt"
    assert input_weights.weights_for_scale([1, 1, 4], weights) == "mt.pt"
    assert input_weights.weights_for_scale(4, weights) == "m4.pt"
    assert input_weights.weights_for_scale([1, 2, 2], weights) == "m.pt"
    assert input_weights.weights_for_scale(2, {"default": "m.pt"}) == "m.pt"


def _lr_file(path, zoom, seed=0):
    """A low-resolution copy of a synthetic brain with `zoom`-times coarser voxels per axis."""
    from tools.fetch_sample_data import make_low_resolution

    image, _ = synthetic_brain((40, 48, 40), seed=seed)
    lr = make_low_resolution(nib.Nifti1Image(image, np.eye(4)), zoom, "gaussian" if len(set(zoom)) > 1 else "none")
    nib.save(lr, str(path))
    return path


@pytest.mark.skipif(
    not (BUNDLES / "rem_sr" / "models" / "model_x2.pt").is_file(),
    reason="rem_sr's per-input weights are not in this checkout",
)
def test_inference_picks_the_weights_for_each_case_and_equals_them_given_explicitly(tmp_path):
    import json

    thick = _lr_file(tmp_path / "thick_1x1x4.nii.gz", (1, 1, 4))
    iso2 = _lr_file(tmp_path / "iso_x2.nii.gz", (2, 2, 2), seed=1)
    (tmp_path / "d.json").write_text(json.dumps({"test": [{"image": thick.name}, {"image": iso2.name}]}))
    # target_spacing 1 mm: the thick file is refined along its slice axis, the x2 file x2 on every axis: two kinds
    base = {"dataset_dir": str(tmp_path), "datalist": str(tmp_path / "d.json"), "target_spacing": 1.0}
    routed = run_bundle("rem_sr", ["inference.json"], {**base, "output_dir": str(tmp_path / "routed")})
    log = routed.stdout
    assert "thick_1x1x4: REM weights model.pt (thick input)" in log, log[-2000:]  # no thick-slice file: model.pt
    assert "iso_x2: REM weights model_x2.pt (x2 input)" in log, log[-2000:]
    for name, weights in (("thick_1x1x4", "model.pt"), ("iso_x2", "model_x2.pt")):
        explicit = tmp_path / f"explicit_{name}"
        run_bundle(
            "rem_sr",
            ["inference.json"],
            {
                "dataset_dir": str(tmp_path),
                "image": str(tmp_path / f"{name}.nii.gz"),
                "target_spacing": 1.0,
                "ckpt_path": str(BUNDLES / "rem_sr" / "models" / weights),
                "output_dir": str(explicit),
            },
        )
        (a,) = (tmp_path / "routed" / name).glob("*_sr.nii.gz")
        (b,) = (explicit / name).glob("*_sr.nii.gz")
        assert np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj))
    # --weights_by_input false: the default weights for every case, and no per-case weights line
    plain = run_bundle(
        "rem_sr", ["inference.json"], {**base, "output_dir": str(tmp_path / "plain"), "weights_by_input": "false"}
    )
    assert "REM weights" not in plain.stdout
    (a,) = (tmp_path / "routed" / "iso_x2").glob("*_sr.nii.gz")
    (c,) = (tmp_path / "plain" / "iso_x2").glob("*_sr.nii.gz")
    assert not np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(c)).dataobj))


def test_handler_refuses_weights_of_another_network(tmp_path):
    networks = load_bundle_scripts("rem_sr", "networks")
    torch.save(networks.REM(k=8, n=2).state_dict(), tmp_path / "k8.pt")
    handler = input_weights.PerInputWeightsHandler(networks.REM(k=4, n=2), {"default": str(tmp_path / "k8.pt")})

    class State:
        batch = {"upsampling_zoom": torch.tensor([[4.0, 4.0, 4.0]]), "name": ["case"]}

    class Engine:
        state = State()

    # BundleInputError is a ValueError; matched by its base class, because another test file in this worker may have
    # re-imported the bundle's `scripts` package (another class object of the same name)
    with pytest.raises(ValueError, match="k8.pt: weights do not match"):
        handler(Engine())
    with pytest.raises(ValueError, match="'default'"):
        input_weights.PerInputWeightsHandler(networks.REM(k=4, n=2), {"x2": "a.pt"})
