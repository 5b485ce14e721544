"""Issue 13, how user files are read and where errors surface, for every bundle:

- kind 7: trailing singleton axes of any count are squeezed; a non-singleton extra axis is one clear error;
- kind 8: one reader (nibabel) for the input checks and the pipeline (Analyze, qform-only NIfTI);
- kind 11: several bundles in one Python process give the same outputs as separate runs;
- kind 12: an unwritable output folder is found before any compute;
- messages: one line at the end of the output, the datalist's sections, the dataset_dir of a relative path.

The shipped weights run on tiny synthetic volumes, so every run takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env, run_bundle, synthetic_brain

LR_SHAPE = (12, 14, 12)  # rem_sr input (x4 -> 48 x 56 x 48)
PAIR_SHAPE = (32, 32, 32)  # registration pairs (f3rnet needs multiples of 16)


def _volume(shape, seed=0) -> np.ndarray:
    return synthetic_brain(shape, seed=seed)[0]


def _save(array: np.ndarray, path: Path, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine), str(path))
    return path


def _datalist(folder: Path, items: list[dict]) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({"test": items}))
    return path


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(nib.load(str(p)).dataobj)
        for p in sorted(folder.rglob("*.nii.gz"))
        if not p.name.startswith(".")
    }


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _rem(tmp_path: Path, items: list[dict], out: Path, check: bool = True, **overrides):
    datalist = _datalist(tmp_path, items)
    return run_bundle(
        "rem_sr",
        ["inference.json"],
        {"dataset_dir": str(tmp_path), "datalist": str(datalist), "output_dir": str(out), **overrides},
        check=check,
    )


def _pair_files(folder: Path, seed: int = 0, moving_shape_suffix=()) -> dict:
    fixed = _volume(PAIR_SHAPE, seed)
    moving = np.roll(fixed, 2, axis=0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return {
        "fixed_image": str(_save(fixed, folder / "fixed.nii.gz", affine)),
        "moving_image": str(_save(moving.reshape(PAIR_SHAPE + moving_shape_suffix), folder / "moving.nii.gz", affine)),
    }


# ------------------------------------------------------------------------------------------ kind 7: singleton axes
def test_trailing_singleton_axes_are_squeezed_for_rem_sr(tmp_path):
    lr = _volume(LR_SHAPE)
    items = []
    for name, suffix in (("d3", ()), ("d4", (1,)), ("d5", (1, 1))):
        _save(lr.reshape(LR_SHAPE + suffix), tmp_path / name / "lr.nii.gz")
        items.append({"name": name, "image": f"{name}/lr.nii.gz"})
    for item in items:  # one run per input: the outputs of each are compared with the 3D input's
        _rem(tmp_path, [item], tmp_path / "out" / item["name"])
    outputs = {item["name"]: _outputs(tmp_path / "out" / item["name"]) for item in items}
    reference = list(outputs["d3"].values())
    assert (48, 56, 48) in [a.shape for a in reference]  # the SR volume (the LR input is written beside it)
    for name in ("d4", "d5"):
        assert len(outputs[name]) == len(reference)
        for a, b in zip(outputs[name].values(), reference):
            np.testing.assert_array_equal(a, b)


def test_trailing_singleton_axes_are_squeezed_for_a_registration_pair(tmp_path):
    outputs = {}
    for name, suffix in (("d3", ()), ("d5", (1, 1))):
        folder = tmp_path / name
        pair = _pair_files(folder, moving_shape_suffix=suffix)
        run_bundle(
            "f3rnet_ct_mri",
            ["inference.json"],
            {
                "moving_image": pair["moving_image"],
                "fixed_image": pair["fixed_image"],
                "output_dir": str(folder / "out"),
            },
        )
        outputs[name] = list(_outputs(folder / "out").values())
    assert len(outputs["d3"]) == len(outputs["d5"]) >= 2
    for a, b in zip(outputs["d3"], outputs["d5"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extra", [(2,), (1, 3)])
def test_a_non_singleton_extra_axis_is_one_clear_error_and_nothing_is_written(tmp_path, extra):
    _save(np.zeros(LR_SHAPE + extra, np.float32), tmp_path / "bad.nii.gz")
    out = tmp_path / "out"
    result = _rem(tmp_path, [{"image": "bad.nii.gz"}], out, check=False)
    assert result.returncode != 0
    shape = LR_SHAPE + extra
    assert _last_line(result.stderr) == f"error: {tmp_path / 'bad.nii.gz'}: expected a 3D volume, got shape {shape}"
    assert "Traceback" not in result.stderr
    assert not list(out.rglob("*.nii.gz"))


# ------------------------------------------------------------------------------------------------ kind 8: one reader
def _pipeline_affine(bundle: str, config: str, key: str, path: Path) -> np.ndarray:
    """The affine the bundle's own LoadImaged gives `path` (the first transform of its preprocessing)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / config))
    parser["bundle_root"] = str(BUNDLES / bundle)
    load = parser.get_parsed_content("preprocessing#transforms#0")
    return np.asarray(load({key: str(path)})[key].affine)


def test_analyze_files_are_read_with_their_own_geometry(tmp_path):
    # LAS, 4 mm voxels, origin (38, -50, -42): an Analyze .hdr/.img pair as LPBA40 ships them
    affine = np.array([[-4.0, 0, 0, 38.0], [0, 4.0, 0, -50.0], [0, 0, 4.0, -42.0], [0, 0, 0, 1]])
    img = nib.AnalyzeImage(_volume(LR_SHAPE), affine)
    path = tmp_path / "lr.img"
    nib.save(img, str(path))
    expected = nib.load(str(path)).affine  # what the input checks read (Analyze keeps the origin as a voxel index)
    assert expected[0, 0] < 0 and expected[1, 1] > 0 and np.abs(expected[:3, 3]).max() > 0  # LAS, origin kept
    for bundle, key in (("rem_sr", "image"), ("refdrn", "moving_image"), ("f3rnet_ct_mri", "moving_image")):
        np.testing.assert_allclose(_pipeline_affine(bundle, "inference.json", key, path), expected, atol=1e-6)


def test_a_qform_only_nifti_is_read_with_its_qform(tmp_path):
    affine = np.array([[0, 0, 2.0, 10.0], [-2.0, 0, 0, 20.0], [0, 2.0, 0, -30.0], [0, 0, 0, 1]])  # an oblique-free PIR
    img = nib.Nifti1Image(_volume(LR_SHAPE), None)
    img.set_qform(affine, code=1)
    img.set_sform(None, code=0)
    path = tmp_path / "qform.nii.gz"
    nib.save(img, str(path))
    np.testing.assert_allclose(_pipeline_affine("rem_sr", "inference.json", "image", path), affine, atol=1e-5)


# ---------------------------------------------------------------------------------- kind 11: bundles in one process
ONE_PROCESS = textwrap.dedent(
    """
    import json, sys
    from monai.bundle import run
    for bundle, overrides in json.loads(sys.argv[1]):
        run(config_file=f"{sys.argv[2]}/{bundle}/configs/inference.json", bundle_root=f"{sys.argv[2]}/{bundle}",
            **overrides)
    """
)


@pytest.mark.parametrize("order", [("rem_sr", "refdrn", "f3rnet_ct_mri"), ("f3rnet_ct_mri", "rem_sr", "refdrn")])
def test_three_bundles_in_one_process_give_the_outputs_of_separate_runs(tmp_path, order):
    _save(_volume(LR_SHAPE), tmp_path / "lr.nii.gz")
    pair = _pair_files(tmp_path / "pair")
    jobs = {
        "rem_sr": {"dataset_dir": str(tmp_path), "datalist": str(_datalist(tmp_path, [{"image": "lr.nii.gz"}]))},
        "refdrn": {"dataset_dir": str(tmp_path), "datalist": str(_datalist(tmp_path / "pair", [pair])), "scale": 1},
        "f3rnet_ct_mri": {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"]},
    }
    together, separate = tmp_path / "together", tmp_path / "separate"
    plan = [(b, {**jobs[b], "output_dir": str(together / b)}) for b in order]
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, json.dumps(plan), str(BUNDLES)],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=REPO_ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for bundle in order:
        run_bundle(bundle, ["inference.json"], {**jobs[bundle], "output_dir": str(separate / bundle)})
        a, b = _outputs(together / bundle), _outputs(separate / bundle)
        assert a and list(a) == list(b), bundle
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{bundle}: {key}")


# ----------------------------------------------------------------------------------- kind 12: found before compute
@pytest.mark.parametrize("blocker", ["parent_is_a_file", "output_is_a_file"])
def test_an_unwritable_output_dir_is_found_before_any_compute(tmp_path, blocker):
    _save(_volume(LR_SHAPE), tmp_path / "lr.nii.gz")
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out" if blocker == "parent_is_a_file" else tmp_path / "file"
    result = _rem(tmp_path, [{"image": "lr.nii.gz"}], out, check=False)
    assert result.returncode != 0
    assert _last_line(result.stderr).startswith(f"error: output_dir {out}: cannot be written")
    assert "Traceback" not in result.stderr
    assert "inferring" not in result.stderr and "Epoch" not in result.stderr + result.stdout  # nothing ran


def test_an_unwritable_output_dir_is_found_before_registration(tmp_path):
    pair = _pair_files(tmp_path / "pair")
    (tmp_path / "file").write_text("not a folder")
    datalist = _datalist(tmp_path / "pair", [pair])
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        {
            "dataset_dir": str(tmp_path),
            "datalist": str(datalist),
            "scale": 1,
            "output_dir": str(tmp_path / "file" / "out"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert _last_line(result.stderr).startswith(f"error: output_dir {tmp_path / 'file' / 'out'}: cannot be written")


# ------------------------------------------------------------------------------------------------------ messages
def test_a_missing_section_lists_the_sections_and_names_data_section(tmp_path):
    _save(_volume(LR_SHAPE), tmp_path / "lr.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "lr.nii.gz"}], "validation": []}))
    result = run_bundle(
        "rem_sr",
        ["inference.json"],
        {"dataset_dir": str(tmp_path), "datalist": str(tmp_path / "datalist.json"), "output_dir": str(tmp_path / "o")},
        check=False,
    )
    assert result.returncode != 0
    assert _last_line(result.stderr) == (
        f"error: datalist {tmp_path / 'datalist.json'} has no items in its 'test' list; it has 'training'. "
        "Choose one with --data_section <name>."
    )


@pytest.mark.parametrize("bundle", ["rem_sr", "f3rnet_ct_mri"])
def test_a_missing_relative_path_names_the_dataset_dir_it_was_resolved_against(tmp_path, bundle):
    key = "image" if bundle == "rem_sr" else "moving_image"
    item = {"name": "case1", key: "sub/absent.nii.gz"}
    if bundle != "rem_sr":
        item["fixed_image"] = _pair_files(tmp_path / "pair")["fixed_image"]
    datalist = _datalist(tmp_path, [item])
    result = run_bundle(
        bundle,
        ["inference.json"],
        {"dataset_dir": str(tmp_path), "datalist": str(datalist), "output_dir": str(tmp_path / "o")},
        check=False,
    )
    assert result.returncode != 0
    assert _last_line(result.stderr) == (
        f"error: datalist {datalist}, 'test' item 0 (case1), key '{key}': {tmp_path / 'sub' / 'absent.nii.gz'}: "
        f"file not found (resolved against dataset_dir {tmp_path})"
    )
    assert "Traceback" not in result.stderr


def test_an_unwritable_checkpoint_dir_is_found_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    ckpt = tmp_path / "file" / "models"
    result = run_bundle(
        "rem_sr", ["train.json"], {"ckpt_dir": str(ckpt), "log_dir": str(tmp_path / "logs")}, check=False
    )
    assert result.returncode != 0
    assert _last_line(result.stderr).startswith(f"error: ckpt_dir {ckpt}: cannot be written")
    assert "Traceback" not in result.stderr
