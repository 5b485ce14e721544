"""Issue 13, kind 6: silent fall-backs.

- a missing model for the chosen direction or variant (f3rnet_ct_mri) is an error that says what to pass, instead of
  running the CT->MRI weights for ``--direction mri2ct`` (then the only ones shipped);
- an unknown override key (``--scael 2``) is an error listing the close matches, instead of a run at the default;
- ``--target_spacing`` rounds grid sizes to the nearest integer (a float32-inexact or oblique header gave 39x39x59
  for 40x40x60) and leaves an axis already at the target spacing unchanged; refdrn's ``--scale`` rounds likewise.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from tests.helpers import BUNDLES, load_bundle_scripts, run_bundle

F3RNET = BUNDLES / "f3rnet_ct_mri"


def _config_files(bundle: str, configs: list[str]):
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    return files[0] if len(files) == 1 else files


def _run_in_process(bundle: str, configs: list[str], **overrides):
    """`monai.bundle.run`, the function the command line calls, in this process."""
    from monai.bundle import run

    load_bundle_scripts(bundle, "common")
    return run(
        config_file=_config_files(bundle, configs), bundle_root=str(BUNDLES / bundle), logging_file=False, **overrides
    )


def _create_workflow(bundle: str, configs: list[str], **overrides):
    """`monai.bundle.create_workflow`: parses the config and runs its `initialize` list only (where the override
    keys are checked), nothing else."""
    from monai.bundle.scripts import create_workflow

    load_bundle_scripts(bundle, "common")
    return create_workflow(
        config_file=_config_files(bundle, configs), bundle_root=str(BUNDLES / bundle), logging_file=False, **overrides
    )


def _bundle_error(exc: BaseException) -> str:
    """The message of the BundleInputError in an exception chain (MONAI wraps a component's error)."""
    while exc is not None:
        if type(exc).__name__ == "BundleInputError":
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    raise AssertionError("no BundleInputError in the chain")


def _last_line(stderr: str) -> str:
    return [line for line in stderr.strip().splitlines() if line.strip()][-1]


# ------------------------------------------------------------------------------- f3rnet: direction and variant
def _missing_weights_message(direction: str, variant: str, key: str = "ckpt_path") -> str:
    checks = load_bundle_scripts("f3rnet_ct_mri", "checks")
    models = f"{F3RNET}/models"
    name = checks.weights_name(direction, variant)
    shipped = ", ".join(sorted(p.name for p in Path(models).glob("model*.pt")))
    label = {"ct2mri": "CT->MRI", "mri2ct": "MRI->CT"}[direction]
    return (
        f"{models}/{name}: weights file not found: no {label} weights of variant '{variant}' are shipped "
        f"({shipped} in {models}; model.pt is CT->MRI, variant none). Train them with "
        f"`python -m monai.bundle run --config_file configs/train.json --direction {direction} --variant {variant}` "
        f"(it saves {name}), or pass --{key} <weights file>"
    )


def test_f3rnet_mri2ct_without_its_weights_is_an_error_that_says_what_to_pass(tmp_path):
    """On the command line: --direction mri2ct never runs CT->MRI weights; a variant whose MRI->CT weights are not
    shipped (encoder) is an error naming the file and the training command."""
    result = run_bundle(
        "f3rnet_ct_mri",
        ["inference.json"],
        {"direction": "mri2ct", "variant": "encoder", "output_dir": str(tmp_path / "out")},
        check=False,
    )
    assert result.returncode != 0
    assert _missing_weights_message("mri2ct", "encoder") in _last_line(result.stderr)
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_f3rnet_variant_without_its_weights_is_an_error_that_says_what_to_pass(tmp_path):
    """Another instance: --variant fr (CT->MRI) looks for model_fr.pt, which is not shipped (not models/model.pt);
    and evaluate.json's --direction mri2ct names the method's weights key."""
    with pytest.raises(Exception) as err:
        _run_in_process("f3rnet_ct_mri", ["inference.json"], variant="fr", output_dir=str(tmp_path / "a"))
    assert _bundle_error(err.value) == _missing_weights_message("ct2mri", "fr")
    with pytest.raises(Exception) as err:
        _run_in_process(
            "f3rnet_ct_mri",
            ["train.json", "evaluate.json"],
            direction="mri2ct",
            method="decoder",
            output_dir=str(tmp_path / "b"),
        )
    assert _bundle_error(err.value) == _missing_weights_message("mri2ct", "decoder", key="method_weights#decoder")


@pytest.mark.parametrize("direction", ["ct2mri", "mri2ct"])
@pytest.mark.parametrize("variant", ["none", "all", "encoder"])
def test_f3rnet_weights_names_agree_between_configs_and_checks(direction, variant):
    """train.json saves, inference.json and evaluate.json look for, and the check expects the same file name."""
    from monai.bundle import ConfigParser

    checks = load_bundle_scripts("f3rnet_ct_mri", "checks")
    expected = checks.weights_name(direction, variant)
    assert expected == (
        "model" + ("_mri2ct" if direction == "mri2ct" else "") + ("" if variant == "none" else f"_{variant}") + ".pt"
    )
    for configs, key, extra in (
        (["inference.json"], "ckpt_path", {"variant": variant}),
        (["train.json"], "weights_name", {"variant": variant}),
        (["train.json", "evaluate.json"], "ckpt_path", {"method": variant}),
    ):
        parser = ConfigParser()
        parser.read_config(_config_files("f3rnet_ct_mri", configs))
        parser.update({"bundle_root": str(F3RNET), "direction": direction, **extra})
        assert Path(parser.get_parsed_content(key)).name == expected, configs
    assert checks.default_weights("/m", "ct2mri") == "/m/model.pt"  # the shipped weights keep their name


# ----------------------------------------------------------------------------------------- unknown override keys
def test_mistyped_override_is_an_error_listing_the_close_matches(tmp_path):
    """The issue's example on the command line: --scael 2 ran at the default x4."""
    result = run_bundle("rem_sr", ["inference.json"], {"scael": 2, "output_dir": str(tmp_path / "out")}, check=False)
    assert result.returncode != 0
    config = BUNDLES / "rem_sr" / "configs" / "inference.json"
    assert _last_line(result.stderr).endswith(
        f"unknown config key --scael (did you mean --scale?): not a key of {config}. "
        "Check the spelling; the model card lists the keys."
    )
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_mistyped_overrides_in_other_bundles_and_args_files(tmp_path):
    """Other instances: refdrn --use_reem, f3rnet evaluate --methd (a merged config list), two typos at once, and a
    typo in an --args_file."""
    with pytest.raises(Exception) as err:
        _create_workflow("refdrn", ["inference.json"], use_reem="false", output_dir=str(tmp_path / "r"))
    assert _bundle_error(err.value) == (
        "unknown config key --use_reem (did you mean --use_rem or --use_rem_flag or --use_amp?): not a key of "
        f"{BUNDLES / 'refdrn' / 'configs' / 'inference.json'}. Check the spelling; the model card lists the keys."
    )
    with pytest.raises(Exception) as err:
        _create_workflow("f3rnet_ct_mri", ["train.json", "evaluate.json"], methd="all", output_dir=str(tmp_path / "f"))
    files = ", ".join(str(BUNDLES / "f3rnet_ct_mri" / "configs" / c) for c in ("train.json", "evaluate.json"))
    assert _bundle_error(err.value) == (
        f"unknown config key --methd (did you mean --method or --io_methods or --base_method?): not a key of {files}. "
        "Check the spelling; the model card lists the keys."
    )
    with pytest.raises(Exception) as err:
        _create_workflow("rem_sr", ["inference.json"], scael=2, roi_sise=[32, 32, 32], output_dir=str(tmp_path / "s"))
    assert _bundle_error(err.value).startswith(
        "unknown config keys --scael (did you mean --scale?); --roi_sise (did you mean --roi_size?)"
    )
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"target_spacnig": 0.7}))
    with pytest.raises(Exception) as err:
        _create_workflow("rem_sr", ["inference.json"], args_file=str(args_file), output_dir=str(tmp_path / "s"))
    assert _bundle_error(err.value).startswith("unknown config key --target_spacnig (did you mean --target_spacing?)")


def test_known_and_nested_overrides_are_accepted(tmp_path):
    """Existing keys, existing nested ids and a new argument of an existing component pass; nothing is checked for
    a config parsed without the bundle runner."""
    workflow = _create_workflow(
        "rem_sr",
        ["inference.json"],
        scale=2,
        **{"inferer#overlap": 0.5, "inferer#cval": 0.0},
        output_dir=str(tmp_path / "ok"),
    )
    assert workflow.parser.get_parsed_content("scale") == 2
    common = load_bundle_scripts("rem_sr", "common")
    assert common.check_override_keys() == []  # no monai.bundle call on the stack


# ------------------------------------------------------------------------------------------------ target spacing
def _lr_file(path: Path, shape, affine) -> Path:
    """A volume that varies along x and y only (every z-slice the same), stored with a float32 affine."""
    rng = np.random.default_rng(0)
    plane = rng.uniform(0.2, 1.0, shape[:2]).astype(np.float32)
    data = np.repeat(plane[:, :, None], shape[2], axis=2)
    img = nib.Nifti1Image(data, np.asarray(affine, np.float32).astype(np.float64))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _upsample(path: Path, **kwargs):
    transforms = load_bundle_scripts("rem_sr", "transforms")
    from monai.transforms import EnsureChannelFirst

    image = EnsureChannelFirst()(LoadImage(image_only=True, reader="NibabelReader")(str(path)))
    return image, transforms.UpsampleToTargetd("image", scale=None, **kwargs)({"image": image})["image"]


def test_target_spacing_rounds_to_the_nearest_size_and_keeps_axes_at_the_target(tmp_path):
    """The issue's example: 40x40x20 at 0.7/0.7/2.1 mm (float32 header) with target 0.7 gave 39x39x59."""
    path = _lr_file(tmp_path / "lr.nii.gz", (40, 40, 20), np.diag([0.7, 0.7, 2.1, 1.0]))
    spacing = np.sqrt((nib.load(str(path)).affine[:3, :3] ** 2).sum(0))
    assert not np.all(spacing == [0.7, 0.7, 2.1])  # float32-inexact, as a scanner header
    image, up = _upsample(path, target_spacing=0.7)
    assert tuple(up.shape[1:]) == (40, 40, 60)
    for z in range(60):  # x and y are not resampled: every output slice is the input's plane, bit for bit
        assert torch.equal(up[0, :, :, z].as_tensor(), image[0, :, :, 0].as_tensor())
    out_affine = np.asarray(up.affine)
    assert np.array_equal(out_affine[:3, :2], np.asarray(image.affine)[:3, :2])  # x, y columns unchanged
    assert np.sqrt((out_affine[:3, 2] ** 2).sum()) == pytest.approx(0.7, abs=1e-6)


def test_target_spacing_on_an_oblique_header_and_non_integer_sizes(tmp_path):
    """Another instance: an oblique affine (30 degrees about z) at 1/1/3 mm with target 1 -> 24x20x24, in-plane
    untouched; and a size that is not an integer multiple rounds to the nearest (10 voxels at 1 mm, 0.7 -> 14)."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    affine = np.array([[c, -s, 0, 5.0], [s, c, 0, -3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]])
    image, up = _upsample(_lr_file(tmp_path / "oblique.nii.gz", (24, 20, 8), affine), target_spacing=1.0)
    assert tuple(up.shape[1:]) == (24, 20, 24)
    assert torch.equal(up[0, :, :, 5].as_tensor(), image[0, :, :, 0].as_tensor())
    _, up = _upsample(_lr_file(tmp_path / "ten.nii.gz", (10, 10, 10), np.eye(4)), target_spacing=0.7)
    assert tuple(up.shape[1:]) == (14, 14, 14)
    _, same = _upsample(
        _lr_file(tmp_path / "same.nii.gz", (10, 10, 10), np.eye(4) * [0.7, 0.7, 0.7, 1]), target_spacing=0.7
    )
    assert tuple(same.shape[1:]) == (10, 10, 10)


def test_refdrn_scale_rounds_to_the_nearest_size():
    transforms = load_bundle_scripts("refdrn", "transforms")
    from monai.data import MetaTensor

    image = MetaTensor(torch.rand(1, 33, 10, 7), affine=torch.eye(4))
    up = transforms.UpsampleToTargetd("image", scale=[2.5, 4, 1])({"image": image})["image"]
    assert tuple(up.shape[1:]) == (83, 40, 7)  # 82.5 -> 83 (was floor: 82); 7 x 1 left unchanged


def test_inference_with_target_spacing_writes_the_intended_grid(tmp_path):
    """The issue's example through inference.json with the shipped weights: the SR output is 40x40x60."""
    _lr_file(tmp_path / "data" / "lr.nii.gz", (40, 40, 20), np.diag([0.7, 0.7, 2.1, 1.0]))
    (tmp_path / "data" / "dl.json").write_text(json.dumps({"test": [{"name": "case", "image": "lr.nii.gz"}]}))
    _run_in_process(
        "rem_sr",
        ["inference.json"],
        datalist=str(tmp_path / "data" / "dl.json"),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
        target_spacing=0.7,
    )
    (sr,) = (tmp_path / "out").rglob("*_sr.nii.gz")
    img = nib.load(str(sr))
    assert img.shape == (40, 40, 60)
    assert np.allclose(img.header.get_zooms()[:3], 0.7, atol=1e-5)
