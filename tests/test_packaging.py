"""tools/package.py (`make package`): zips that `monai.bundle download` unpacks and runs, the model zoo's
model_info.json, and the declared rem_sr dependency of refdrn."""

import hashlib
import json
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env
from tests.test_export_bundles import bundle_copies

TOOL = REPO_ROOT / "tools" / "package.py"


def package(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=cwd,
        timeout=300,
    )


def version(bundle_root):
    return json.loads((bundle_root / "configs" / "metadata.json").read_text())["version"]


@pytest.fixture(scope="module")
def rem_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    result = package("rem_sr", "--output-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, out / f"rem_sr_v{version(BUNDLES / 'rem_sr')}.zip", result


def test_zip_has_the_download_layout_and_nothing_else(rem_zip):
    _, zip_path, _ = rem_zip
    names = zipfile.ZipFile(zip_path).namelist()
    files = {n for n in names if not n.endswith("/")}
    assert all(n.startswith("rem_sr/") for n in names)
    for required in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/logging.conf",
        "models/model.pt",
        "scripts/networks.py",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
    ):
        assert f"rem_sr/{required}" in files, required
    assert {n.split("/")[1] for n in files} == {"configs", "models", "scripts", "docs", "LICENSE"}
    # model.pt and the extra per-degradation weights; no .ts/.onnx/checkpoints
    assert sorted(n for n in files if n.startswith("rem_sr/models/")) == [
        "rem_sr/models/model.pt",
        "rem_sr/models/model_x2.pt",
    ]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/eval/" in n or "/logs/" in n]
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read("rem_sr/models/model.pt") == (BUNDLES / "rem_sr" / "models" / "model.pt").read_bytes()


def test_model_info_follows_the_zoo_format_with_the_zip_checksum(rem_zip, tmp_path):
    out, zip_path, _ = rem_zip
    info = json.loads((out / "model_info.json").read_text())
    key = f"rem_sr_v{version(BUNDLES / 'rem_sr')}"
    assert list(info) == [key]
    assert set(info[key]) == {"checksum", "sha256", "source"}
    assert info[key]["checksum"] == hashlib.sha1(zip_path.read_bytes()).hexdigest()  # the zoo's hash type
    assert info[key]["sha256"] == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    assert info[key]["source"] == zip_path.as_uri()
    # reproducible: packaging again gives the same bytes; a --base-url goes into "source"; other entries are kept
    (tmp_path / "model_info.json").write_text(json.dumps({"other_bundle_v1.0.0": {"checksum": "x", "source": "y"}}))
    again = package("rem_sr", "--output-dir", tmp_path, "--base-url", "https://example.org/zoo/")
    assert again.returncode == 0, again.stderr
    info2 = json.loads((tmp_path / "model_info.json").read_text())
    assert info2[key] == {
        "checksum": info[key]["checksum"],
        "sha256": info[key]["sha256"],
        "source": f"https://example.org/zoo/{zip_path.name}",
    }
    assert info2["other_bundle_v1.0.0"] == {"checksum": "x", "source": "y"}
    assert not list(tmp_path.glob(".partial-*"))


def test_monai_bundle_download_unpacks_the_zip_and_its_inference_runs(rem_zip, brain_data, tmp_path):
    out, zip_path, _ = rem_zip
    info = json.loads((out / "model_info.json").read_text())
    entry = info[zip_path.stem]
    work = tmp_path / "elsewhere"  # outside the repository
    work.mkdir()
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            "rem_sr",
            "--version",
            version(BUNDLES / "rem_sr"),
            "--url",
            entry["source"],
            "--bundle_dir",
            str(work / "bundles"),
        ],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=work,
        timeout=300,
    )
    assert download.returncode == 0, download.stderr[-3000:]
    root = work / "bundles" / "rem_sr"
    assert (root / "configs" / "inference.json").is_file() and (root / "models" / "model.pt").is_file()
    # the file MONAI downloaded is the one model_info.json describes
    assert hashlib.sha1((work / "bundles" / "rem_sr.zip").read_bytes()).hexdigest() == entry["checksum"]

    item = {"image": str(brain_data / "lr_syn3_T1w.nii.gz")}
    (work / "datalist.json").write_text(json.dumps({"test": [item]}))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(root / "configs" / "inference.json"),
            "--bundle_root",
            str(root),
            "--datalist",
            str(work / "datalist.json"),
            "--dataset_dir",
            str(work),
            "--output_dir",
            str(work / "out"),
            "--scale",
            "2",
            "--roi_size",
            "[24, 24, 24]",
        ],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=work,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    sr = nib.load(str(work / "out" / "lr_syn3_T1w" / "lr_syn3_T1w_sr.nii.gz"))
    assert sr.shape == nib.load(str(brain_data / "syn3_T1w.nii.gz")).shape
    assert np.isfinite(sr.get_fdata()).all() and sr.get_fdata().std() > 0


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return bundle_copies(tmp_path_factory.mktemp("bundles"))


def test_refdrn_zip_declares_rem_sr_and_both_work_side_by_side(copies, tmp_path):
    result = package("--bundles-dir", copies, "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    rem_version = version(copies / "rem_sr")
    assert f"depends on rem_sr {rem_version}" in result.stdout
    refdrn_zip = tmp_path / "out" / f"refdrn_v{version(copies / 'refdrn')}.zip"
    with zipfile.ZipFile(refdrn_zip) as zf:
        meta = json.loads(zf.read("refdrn/configs/metadata.json"))
        # refdrn's own weights only (model.pt, backbone_x4.pt): REM's weights are never copied in, they come from
        # the rem_sr dependency
        packed = {n for n in zf.namelist() if n.startswith("refdrn/models/") and n.endswith(".pt")}
        own = {f"refdrn/models/{p.name}" for p in (copies / "refdrn" / "models").glob("*.pt")}
        assert packed == own and "refdrn/models/model.pt" in packed
        rem_bytes = (copies / "rem_sr" / "models" / "model.pt").read_bytes()
        assert all(zf.read(n) != rem_bytes for n in packed)
    assert meta["bundle_dependencies"] == {"rem_sr": rem_version}
    info = json.loads((tmp_path / "out" / "model_info.json").read_text())
    assert set(info) == {f"rem_sr_v{rem_version}", refdrn_zip.stem}

    # both downloaded into one bundle_dir (MONAI's API this time): refdrn builds its cascade with the sibling REM
    from monai.bundle import download

    dl = tmp_path / "dl"
    for key, name in ((f"rem_sr_v{rem_version}", "rem_sr"), (refdrn_zip.stem, "refdrn")):
        download(name=name, url=info[key]["source"], bundle_dir=str(dl), progress=False)
    root = dl / "refdrn"
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            str(root / "configs" / "metadata.json"),
            "--config_file",
            str(root / "configs" / "inference.json"),
            "--bundle_root",
            str(root),
            "--device",
            "cpu",
            "--n",
            "1",
        ],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=root,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]


def test_a_missing_dependency_is_one_clear_error_and_nothing_is_written(copies, tmp_path):
    lonely = tmp_path / "bundles"
    lonely.mkdir()
    (lonely / "refdrn").symlink_to(copies / "refdrn", target_is_directory=True)
    result = package("refdrn", "--bundles-dir", lonely, "--output-dir", tmp_path / "out")
    assert result.returncode == 1
    declared = json.loads((copies / "refdrn" / "configs" / "metadata.json").read_text())["bundle_dependencies"][
        "rem_sr"
    ]
    assert f"error: refdrn depends on bundle rem_sr {declared}" in result.stderr
    assert f"{lonely / 'rem_sr'} is not a bundle" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_incompatible_or_untrained_dependency_is_rejected(copies, tmp_path):
    import shutil

    bundles = tmp_path / "bundles"
    shutil.copytree(copies, bundles)
    meta_path = bundles / "rem_sr" / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    declared = json.loads((bundles / "refdrn" / "configs" / "metadata.json").read_text())["bundle_dependencies"]
    major, minor, _ = (int(v) for v in declared["rem_sr"].split("."))
    newer_minor, later_patch = f"{major}.{minor + 1}.0", f"{major}.{minor}.3"
    meta["version"] = newer_minor
    meta["changelog"][newer_minor] = "a newer, incompatible release"
    meta_path.write_text(json.dumps(meta))
    result = package("refdrn", "--bundles-dir", bundles, "--output-dir", tmp_path / "out")
    assert result.returncode == 1
    assert f"has version {newer_minor}, which is not compatible" in result.stderr
    meta["version"] = later_patch  # a later patch of the same series is fine ...
    meta_path.write_text(json.dumps(meta))
    assert package("refdrn", "--bundles-dir", bundles, "--output-dir", tmp_path / "out").returncode == 0
    (bundles / "rem_sr" / "models" / "model.pt").unlink()  # ... but not without its weights
    result = package("refdrn", "--bundles-dir", bundles, "--output-dir", tmp_path / "out2")
    assert result.returncode == 1 and "rem_sr/models/model.pt is missing" in result.stderr


def test_version_compatibility_rule():
    from tools.package import PackagingError, compatible

    assert compatible("0.1.0", "0.1.0") and compatible("0.1.0", "0.1.7")
    assert not compatible("0.1.0", "0.2.0") and not compatible("0.1.2", "0.1.1")
    assert compatible("1.2.0", "1.9.0") and not compatible("1.2.0", "2.0.0")
    with pytest.raises(PackagingError, match="MAJOR.MINOR.PATCH"):
        compatible("0.1", "0.1.0")


def test_f3rnet_zip_runs_its_shipped_weights_after_unpacking_elsewhere(tmp_path):
    from tools import make_abdomen_phantoms

    out = tmp_path / "packages"
    result = package("f3rnet_ct_mri", "--output-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    stem = f"f3rnet_ct_mri_v{version(BUNDLES / 'f3rnet_ct_mri')}"
    entry = json.loads((out / "model_info.json").read_text())[stem]
    assert hashlib.sha256((out / f"{stem}.zip").read_bytes()).hexdigest() == entry["sha256"]

    work = tmp_path / "elsewhere"  # outside the repository
    work.mkdir()
    from monai.bundle import download

    download(name="f3rnet_ct_mri", url=entry["source"], bundle_dir=str(work / "bundles"), progress=False)
    root = work / "bundles" / "f3rnet_ct_mri"
    assert (root / "models" / "model.pt").read_bytes() == (
        BUNDLES / "f3rnet_ct_mri" / "models" / "model.pt"
    ).read_bytes()

    shape = (36, 40, 32)  # not a multiple of 16: the pad-then-crop path with the shipped full-width network
    make_abdomen_phantoms.main(["--out", str(work / "phantoms"), "--n-subjects", "4", "--shape", *map(str, shape)])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(root / "configs" / "inference.json"),
            "--bundle_root",
            str(root),
            "--dataset_dir",
            str(work / "phantoms"),
            "--output_dir",
            str(work / "out"),
        ],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=work,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ddf = nib.load(str(work / "out" / "case003" / "case003_ddf.nii.gz"))  # named by the datalist item's name
    assert ddf.shape[:3] == shape and ddf.shape[-1] == 3
    assert np.isfinite(np.asarray(ddf.dataobj)).all()


@pytest.mark.parametrize("bundle", ["refdrn", "f3rnet_ct_mri"])
def test_every_shipped_weights_file_is_packaged(bundle):
    """bundle_files: models/model.pt and every other shipped weights file (refdrn's backbone_x4.pt and rows of its
    table, f3rnet's other directions and variants), never checkpoints or exports."""
    sys.path.insert(0, str(REPO_ROOT))
    from tools.package import bundle_files

    root = BUNDLES / bundle
    packaged = {rel for _, rel in bundle_files(root)}
    shipped = {f"models/{p.name}" for p in (root / "models").glob("*.pt") if not p.name.startswith("checkpoint")}
    assert shipped <= packaged and "models/model.pt" in packaged
    assert not [rel for rel in packaged if rel.endswith((".ts", ".onnx")) or "/runs/" in rel]
