"""rem_sr's train.json options that change the training pipeline, checked by parsing the config."""

import pytest
from monai.bundle import ConfigParser
from monai.transforms import RandAdjustContrastd

from tests.helpers import BUNDLES, load_bundle_scripts, run_bundle


def training_transforms(**overrides) -> list:
    checks = load_bundle_scripts("rem_sr", "checks")  # puts rem_sr's `scripts` first on sys.path
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "rem_sr" / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / "rem_sr"), **overrides})
    parser.parse()
    try:
        return list(parser.get_parsed_content("train#preprocessing").transforms)
    except Exception as e:  # the parser wraps the callable's error
        while e.__cause__ is not None and not isinstance(e, checks.BundleInputError):
            e = e.__cause__
        raise e


@pytest.mark.parametrize("flag", [False, "false", "False", 0])
def test_intensity_augmentation_is_off_by_default_and_when_false(flag):
    default = training_transforms()
    assert not any(isinstance(t, RandAdjustContrastd) for t in default)
    assert [type(t) for t in training_transforms(intensity_augmentation=flag)] == [type(t) for t in default]


@pytest.mark.parametrize("flag", [True, "true", "True"])
def test_intensity_augmentation_adds_gamma_before_the_degradation(flag):
    transforms = training_transforms(intensity_augmentation=flag, gamma_prob=0.7, gamma_range=[0.8, 1.2])
    names = [type(t).__name__ for t in transforms]
    gamma = names.index("RandAdjustContrastd")
    # gamma acts on the HR volume, before it is copied to the target and degraded into the input
    assert gamma < names.index("CopyItemsd") < names.index("MultiScaleDegraded")
    assert transforms[gamma].prob == pytest.approx(0.7)
    assert transforms[gamma].adjuster.gamma == (0.8, 1.2)


def test_intensity_augmentation_rejects_a_non_boolean():
    checks = load_bundle_scripts("rem_sr", "checks")
    with pytest.raises(checks.BundleInputError, match="intensity_augmentation must be true or false"):
        training_transforms(intensity_augmentation="maybe")


def test_train_runs_with_intensity_augmentation_through_the_bundle_runner(brain_data, tmp_path):
    result = run_bundle("rem_sr", ["train.json"], {
        "patch_size": [16, 16, 16], "batch_size": 2, "max_iterations": 2, "val_interval": 2,
        "val_roi_size": [24, 24, 24], "num_workers": 0, "rem_k": 4, "rem_n": 2,
        "intensity_augmentation": "true", "dataset_dir": str(brain_data),
        "datalist": str(brain_data / "datalist.json"), "ckpt_dir": str(tmp_path / "models"),
        "log_dir": str(tmp_path / "logs")})
    assert "val_psnr" in result.stdout + result.stderr
    assert (tmp_path / "models" / "model.pt").exists()
