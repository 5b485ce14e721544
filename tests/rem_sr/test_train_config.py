"""rem_sr's train.json options that change the training pipeline, checked by parsing the config."""

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import RandAdjustContrastd, RandBiasFieldd, RandScaleIntensityd, RandZoomd

from tests.helpers import BUNDLES, load_bundle_scripts, run_bundle


def parsed_train_item(item_id: str, **overrides):
    """One parsed item of rem_sr's train.json, with the bundle's own error (not the parser's wrapper)."""
    checks = load_bundle_scripts("rem_sr", "checks")  # puts rem_sr's `scripts` first on sys.path
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "rem_sr" / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / "rem_sr"), **overrides})
    parser.parse()
    try:
        return parser.get_parsed_content(item_id)
    except Exception as e:  # the parser wraps the callable's error
        while e.__cause__ is not None and not isinstance(e, checks.BundleInputError):
            e = e.__cause__
        raise e


def training_transforms(**overrides) -> list:
    return list(parsed_train_item("train#preprocessing", **overrides).transforms)


def training_datalist(**overrides) -> list:
    return parsed_train_item("train#datalist", **overrides)


@pytest.mark.parametrize("flag", [False, "false", "False", 0])
def test_intensity_augmentation_is_off_by_default_and_when_false(flag):
    default = training_transforms()
    augmenters = (RandZoomd, RandAdjustContrastd, RandScaleIntensityd, RandBiasFieldd)
    assert not any(isinstance(t, augmenters) for t in default)
    assert [type(t) for t in training_transforms(intensity_augmentation=flag)] == [type(t) for t in default]


@pytest.mark.parametrize("flag", [True, "true", "True"])
def test_intensity_augmentation_acts_on_the_hr_volume_before_the_degradation(flag):
    transforms = training_transforms(
        intensity_augmentation=flag,
        gamma_prob=0.7,
        gamma_range=[0.8, 1.2],
        scale_intensity_prob=0.4,
        scale_intensity_factors=[-0.1, 0.2],
        bias_field_prob=0.2,
        bias_field_coeff=[0.0, 0.05],
    )
    names = [type(t).__name__ for t in transforms]
    # each acts on the HR volume, before it is copied to the target and degraded into the input,
    # so the input and the target always share the contrast
    augmenters = ["RandAdjustContrastd", "RandScaleIntensityd", "RandBiasFieldd"]
    assert max(names.index(a) for a in augmenters) < names.index("CopyItemsd") < names.index("RandDegraded")
    gamma, scale, bias = (transforms[names.index(a)] for a in augmenters)
    assert gamma.prob == pytest.approx(0.7) and gamma.adjuster.gamma == (0.8, 1.2)
    assert scale.prob == pytest.approx(0.4)
    assert tuple(scale.scaler.factors) == (-0.1, 0.2)
    assert bias.prob == pytest.approx(0.2) and tuple(bias.rand_bias_field.coeff_range) == (0.0, 0.05)


@pytest.mark.parametrize("flag", [True, "true"])
def test_zoom_augmentation_shrinks_the_hr_anatomy_before_the_degradation(flag):
    transforms = training_transforms(zoom_augmentation=flag, zoom_prob=0.6, zoom_range=[0.8, 0.9])
    names = [type(t).__name__ for t in transforms]
    assert "RandAdjustContrastd" not in names  # independent of the intensity augmentation
    zoom = transforms[names.index("RandZoomd")]
    assert names.index("RandZoomd") < names.index("CopyItemsd") < names.index("RandDegraded")
    assert zoom.prob == pytest.approx(0.6)
    assert (tuple(zoom.rand_zoom.min_zoom), tuple(zoom.rand_zoom.max_zoom)) == ((0.8,), (0.9,))
    # the zoomed volume keeps its new size: anatomy gets denser on the same 1 mm voxel grid
    assert zoom.rand_zoom.keep_size is False
    assert zoom.rand_zoom.mode == "area"  # area averaging: no aliasing when shrinking


def test_intensity_augmentation_rejects_a_non_boolean():
    checks = load_bundle_scripts("rem_sr", "checks")
    with pytest.raises(checks.BundleInputError, match="intensity_augmentation must be true or false"):
        training_transforms(intensity_augmentation="maybe")


def _tiny_train(brain_data, tmp_path, check=True, **overrides):
    return run_bundle(
        "rem_sr",
        ["train.json"],
        {
            "patch_size": [16, 16, 16],
            "crop_margin": 4,
            "batch_size": 1,
            "max_iterations": 1,
            "val_interval": 1,
            "val_max_window_voxels": 24**3,
            "num_workers": 0,
            "rem_k": 4,
            "rem_n": 2,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist.json"),
            "ckpt_dir": str(tmp_path / "models"),
            "log_dir": str(tmp_path / "logs"),
            **overrides,
        },
        check=check,
    )


def test_train_runs_with_intensity_augmentation_through_the_bundle_runner(brain_data, tmp_path):
    # batch_size 3 puts all three training volumes in one batch: two have a "mask" entry and
    # nibabel's anatomical.nii has none, which must not break the collation
    result = _tiny_train(
        brain_data,
        tmp_path,
        batch_size=3,
        max_iterations=2,
        val_interval=2,
        intensity_augmentation="true",
        zoom_augmentation="true",
        zoom_prob=1.0,
        # anatomical.nii (25 voxels along z) holds a 16-voxel crop only without margin once zoomed by 0.7; factors
        # that divide 16 keep the trimmed crop at the patch size
        crop_margin=0,
        thick_scales=[2, 4],
    )
    assert "val_psnr" in result.stdout + result.stderr
    assert (tmp_path / "models" / "model.pt").exists()


def test_pretrained_weights_initialise_the_network(brain_data, tmp_path):
    networks = load_bundle_scripts("rem_sr", "networks")
    torch.manual_seed(7)
    start = networks.REM(k=4, n=2).state_dict()
    torch.save(start, tmp_path / "start.pt")
    # a learning rate of 1e-12 leaves the weights where they started, so the saved model must
    # equal the pretrained one (and differ from the seeded random initialisation of the run)
    _tiny_train(brain_data, tmp_path, pretrained_weights=str(tmp_path / "start.pt"), learning_rate=1e-12, min_lr=1e-12)
    saved = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert saved.keys() == start.keys()
    for key in start:
        torch.testing.assert_close(saved[key], start[key], atol=1e-6, rtol=0)


def test_pretrained_weights_of_another_network_fail_clearly_before_training(brain_data, tmp_path):
    networks = load_bundle_scripts("rem_sr", "networks")
    torch.save(networks.REM(k=8, n=2).state_dict(), tmp_path / "k8.pt")
    result = _tiny_train(brain_data, tmp_path, pretrained_weights=str(tmp_path / "k8.pt"), check=False)
    assert result.returncode != 0
    assert "weights do not match the configured network REM" in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def test_zoom_augmentation_needs_volumes_that_hold_a_patch_after_shrinking(brain_data, tmp_path):
    # nibabel's anatomical.nii is 33x41x25: a 24^3 patch fits, but not once it is zoomed by 0.7
    checks = load_bundle_scripts("rem_sr", "checks")
    overrides = {
        "dataset_dir": str(brain_data),
        "datalist": str(brain_data / "datalist.json"),
        "patch_size": [24, 24, 24],
        "crop_margin": 0,
    }
    assert len(training_datalist(**overrides)) == 4  # 3 images + 1 label map
    with pytest.raises(
        checks.BundleInputError,
        match=r"anatomical_T1w.nii.gz: shape \(33, 41, 25\) is smaller than the minimum \(35, 35, 35\)",
    ):
        training_datalist(zoom_augmentation=True, zoom_range=[0.7, 1.0], **overrides)


def test_label_maps_are_synthesised_then_augmented_then_degraded_in_the_order_of_synthsr():
    transforms = training_transforms(intensity_augmentation=True, elastic_prob=0.3, thick_prob=0.6)
    names = [type(t).__name__ for t in transforms]
    order = ["RandWeightedCropd", "Rand3DElasticd", "RandLabelSynthd", "RandAdjustContrastd", "CopyItemsd"]
    order += ["RandDegraded", "CenterSpatialCropd"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    elastic = transforms[names.index("Rand3DElasticd")]
    assert elastic.prob == pytest.approx(0.3) and list(elastic.mode) == ["nearest"]
    degrade = transforms[names.index("RandDegraded")]
    assert degrade.thick_prob == pytest.approx(0.6) and degrade.thick_scales == [2, 3, 4, 5, 6]
    crop = transforms[names.index("RandWeightedCropd")]
    assert tuple(crop.cropper.spatial_size) == (84, 84, 84)  # patch 64 + 2 x crop_margin 10


def test_validation_covers_every_configured_degradation(brain_data):
    overrides = {
        "dataset_dir": str(brain_data),
        "datalist": str(brain_data / "datalist.json"),
        "patch_size": [16, 16, 16],
        "crop_margin": 4,
    }
    items = parsed_train_item("validate#datalist", **overrides)
    assert [i["name"] for i in items] == ["syn2_x2", "syn2_x4", "syn2_1x1x4"]
    sampler = parsed_train_item("train#sampler", synthetic_fraction=0.25, val_interval=10, batch_size=2, **overrides)
    weights = sampler.weights.tolist()
    assert sampler.num_samples == 20 and sum(weights[-1:]) == pytest.approx(0.25)  # the label map is last


def test_a_mix_that_needs_label_maps_fails_clearly_without_them(tmp_path):
    checks = load_bundle_scripts("rem_sr", "checks")
    import json

    from tests.helpers import save_nifti, synthetic_brain

    image, _ = synthetic_brain((40, 40, 40))
    save_nifti(image, tmp_path / "a.nii.gz")
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "validation": []}))
    with pytest.raises((ValueError, checks.BundleInputError), match="no 'labels' items"):
        parsed_train_item(
            "train#sampler",
            dataset_dir=str(tmp_path),
            datalist=str(tmp_path / "d.json"),
            patch_size=[16, 16, 16],
            crop_margin=4,
        )
