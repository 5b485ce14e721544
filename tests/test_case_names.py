"""Issue 13, kind 1: outputs never overwrite each other. Every case gets its own output folder, named by the datalist
item's ``name`` or, without one, by a unique name derived from its files (``common.unique_case_names``); a
collision is refused before anything is written. All three bundles' inference.json, with their shipped weights on
tiny volumes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import load_bundle_scripts, synthetic_brain
from tests.user_files import datalist, hr_pair, lr_pair, read, refusal, run_in_process, save
from tools import make_abdomen_phantoms


@pytest.fixture(scope="module")
def common():
    return load_bundle_scripts("rem_sr", "common")


# ------------------------------------------------------------------------------------------- the naming rule
def test_same_file_name_in_two_folders_gets_the_folder_names(common):
    """The issue's rem_sr datalist: p1/t1.nii.gz and p2/t1.nii.gz."""
    items = common.unique_case_names([{"image": "/data/p1/t1.nii.gz"}, {"image": "/data/p2/t1.nii.gz"}])
    assert [i["name"] for i in items] == ["p1_t1", "p2_t1"]


def test_pairs_sharing_the_moving_image_get_moving_to_fixed_names(common):
    items = [
        {"moving_image": "/d/m.nii.gz", "fixed_image": "/d/f1.nii.gz"},
        {"moving_image": "/d/m.nii.gz", "fixed_image": "/d/f2.nii.gz"},
        {"moving_image": "/d/other.nii.gz", "fixed_image": "/d/f2.nii.gz"},
    ]
    names = [i["name"] for i in common.unique_case_names(items, ("moving_image", "fixed_image"))]
    assert names == ["m_to_f1", "m_to_f2", "other"]


def test_given_names_are_kept_and_derived_names_avoid_them(common):
    items = [{"image": "/d/a/sub.01_T1w.nii.gz"}, {"image": "/d/b/x.nii.gz", "name": "sub.01_T1w"}]
    assert [i["name"] for i in common.unique_case_names(items)] == ["a_sub.01_T1w", "sub.01_T1w"]


def test_duplicate_given_names_and_identical_files_are_refused(common):
    with pytest.raises(common.BundleInputError) as err:
        common.unique_case_names([{"image": "/d/a.nii.gz", "name": "x"}, {"image": "/d/b.nii.gz", "name": "x"}])
    assert str(err.value) == (
        "datalist items 0 and 1 have the same name 'x': each case needs its own output folder; make the names unique"
    )
    with pytest.raises(common.BundleInputError) as err:
        common.unique_case_names([{"image": "/d/a.nii.gz"}, {"image": "/d/a.nii.gz"}])
    assert str(err.value) == (
        "datalist items 0 and 1 cannot be told apart by their files (/d/a.nii.gz): both would write to the output "
        "folder 'a'; give each item a distinct 'name'"
    )
    with pytest.raises(common.BundleInputError) as err:
        common.unique_case_names([{"image": "/d/a.nii.gz", "name": "p/q"}])
    assert str(err.value) == (
        "datalist item 0: name 'p/q' cannot name an output folder (empty, '.', '..' or with '/' or '\\')"
    )


# ------------------------------------------------------------------------------------------ the bundles' runs
def test_rem_sr_two_inputs_named_t1_in_two_folders_give_two_outputs(tmp_path):
    """The issue's example: before, both wrote t1/t1_sr.nii.gz and only p2's survived."""
    for folder, seed in (("p1", 1), ("p2", 2)):
        lr, _ = synthetic_brain((12, 14, 10), seed=seed)
        save(lr, tmp_path / "data" / folder / "t1.nii.gz", np.diag([4.0, 4.0, 4.0, 1.0]))
    items = [{"image": "p1/t1.nii.gz"}, {"image": "p2/t1.nii.gz"}]
    out = tmp_path / "out"
    run_in_process(
        "rem_sr",
        "inference.json",
        datalist=datalist(tmp_path / "dl.json", items),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(out),
    )
    assert sorted(p.name for p in out.iterdir()) == ["p1_t1", "p2_t1"]
    for folder in ("p1", "p2"):
        case = out / f"{folder}_t1"
        assert sorted(p.name for p in case.iterdir()) == [f"{folder}_t1_lr.nii.gz", f"{folder}_t1_sr.nii.gz"]
        np.testing.assert_array_equal(
            read(case / f"{folder}_t1_lr.nii.gz"), read(tmp_path / "data" / folder / "t1.nii.gz")
        )
    assert not np.allclose(read(out / "p1_t1" / "p1_t1_sr.nii.gz"), read(out / "p2_t1" / "p2_t1_sr.nii.gz"))


def test_refdrn_two_pairs_sharing_the_moving_image_give_two_folders(tmp_path):
    """The issue's example for refdrn: the same moving_image with two fixed images."""
    first = lr_pair(tmp_path / "a", seeds=(3, 4))
    second = lr_pair(tmp_path / "b", seeds=(3, 5))
    items = [
        {"moving_image": first["moving_image"], "fixed_image": first["fixed_image"]},
        {"moving_image": first["moving_image"], "fixed_image": second["fixed_image"]},
    ]
    out = tmp_path / "out"
    run_in_process(
        "refdrn",
        "inference.json",
        datalist=datalist(tmp_path / "dl.json", items),
        dataset_dir=str(tmp_path),
        output_dir=str(out),
    )
    # both fixed files are called fixed_lr: the pair names add their parent folders
    names = ["a_moving_lr_to_a_fixed_lr", "a_moving_lr_to_b_fixed_lr"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert not np.allclose(*[read(out / n / f"{n}_sr_fixed.nii.gz") for n in names])
    for name in names:
        assert len(list((out / name).glob("*.nii.gz"))) == 5  # sr_fixed, sr_moving, ddf, ddf_itk, warped (no label)


def test_f3rnet_pairs_sharing_the_moving_image_and_named_items_give_their_folders(tmp_path):
    """Another instance: f3rnet, one pair named in the datalist, one not (its name derived)."""
    root = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", "32", "32", "32"])
    moving = str(root / "ct" / "case003_ct.nii.gz")
    items = [
        {"name": "liver.case", "moving_image": moving, "fixed_image": str(root / "mr" / "case003_mr.nii.gz")},
        {"moving_image": moving, "fixed_image": str(root / "mr" / "case002_mr.nii.gz")},
    ]
    out = tmp_path / "out"
    dl = datalist(tmp_path / "dl.json", items, direction="ct2mri")
    run_in_process("f3rnet_ct_mri", "inference.json", datalist=dl, dataset_dir=str(root), output_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["case003_ct", "liver.case"]
    assert sorted(p.name for p in (out / "liver.case").iterdir()) == [
        "liver.case_ddf.nii.gz",
        "liver.case_ddf_itk.nii.gz",
        "liver.case_warped.nii.gz",
    ]
    ddfs = [read(out / n / f"{n}_ddf.nii.gz") for n in ("case003_ct", "liver.case")]
    assert not np.allclose(*ddfs)


@pytest.mark.parametrize("bundle", ["rem_sr", "refdrn", "f3rnet_ct_mri"])
def test_a_name_collision_is_refused_before_anything_is_written(tmp_path, bundle):
    if bundle == "rem_sr":
        lr, _ = synthetic_brain((12, 14, 10), seed=1)
        image = save(lr, tmp_path / "a.nii.gz", np.diag([4.0, 4.0, 4.0, 1.0]))
        items = [{"name": "case", "image": image}, {"name": "case", "image": image}]
        extra = {}
    else:
        pair = lr_pair(tmp_path) if bundle == "refdrn" else hr_pair(tmp_path)
        item = {"name": "case", "moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"]}
        items, extra = [item, dict(item)], ({"direction": "ct2mri"} if bundle == "f3rnet_ct_mri" else {})
    message = refusal(
        bundle,
        "inference.json",
        tmp_path / "out",
        datalist=datalist(tmp_path / "dl.json", items, **extra),
        dataset_dir=str(tmp_path),
    )
    assert message == (
        "datalist items 0 and 1 have the same name 'case': each case needs its own output folder; make the names unique"
    )
