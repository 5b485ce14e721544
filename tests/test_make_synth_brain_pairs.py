"""tools/make_synth_brain_pairs.py: SynthMorph-style brain pairs from label maps, on tiny label maps."""

import json

import nibabel as nib
import numpy as np
import pytest

from tools import make_synth_brain_pairs as synth

SHAPE = (40, 48, 40)


def label_map(seed: int = 0) -> np.ndarray:
    """A tiny brain-like label map: an ellipsoid split into parcels with large, sparse ids."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    r = np.sqrt((((grid - centre[:, None, None, None]) / (np.array(SHAPE) * 0.4)[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros(SHAPE, np.int16)
    seeds = rng.uniform(0, 1, (6, 3)) * np.array(SHAPE)
    nearest = np.argmin(((grid[None] - seeds[:, :, None, None, None]) ** 2).sum(1), 0)
    labels[r < 1] = (1000 + 7 * nearest[r < 1]).astype(np.int16)
    return labels


def test_relabel_compacts_ids():
    labels = label_map()
    out = synth.relabel(labels)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == set(range(len(np.unique(labels))))
    assert np.array_equal(out > 0, labels > 0)
    many = np.arange(300, dtype=np.int32).reshape(3, 10, 10)
    assert synth.relabel(many).dtype == np.uint16


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_pair_labels_follow_the_images_under_the_known_warp(family):
    labels = synth.relabel(label_map())
    pair = synth.make_pair(labels, np.random.default_rng(3), family)
    fixed, moving, ddf = pair["fixed_label"], pair["moving_label"], pair["ddf"]
    assert ddf.shape == (3,) + SHAPE and ddf.dtype == np.float32
    # moving_label(x) = fixed_label(x + ddf(x)) (MONAI Warp's convention, nearest neighbour)
    assert np.array_equal(synth.warp(fixed, ddf, order=0), moving)
    assert (fixed != moving).mean() > 0.005
    norm = np.linalg.norm(ddf, axis=0).max()
    assert synth.PAIR_MM[0] * 0.8 < norm < synth.PAIR_MM[1] * 1.2
    for role in ("fixed", "moving"):
        image, lab = pair[f"{role}_image"], pair[f"{role}_label"]
        assert image.dtype == np.float32 and image.shape == SHAPE
        assert image.min() >= 0 and image.max() <= 1 and (image[lab == 0] == 0).all()
    # one label-to-intensity table per pair (LNCC is monomodal): the per-label means agree between the images
    ids = np.unique(fixed)[1:]
    means = [[np.median(pair[f"{r}_image"][pair[f"{r}_label"] == k]) for k in ids] for r in ("fixed", "moving")]
    assert np.corrcoef(means)[0, 1] > 0.6


def test_train_deformations_are_diffeomorphic_and_heldout_is_another_kind():
    rng = np.random.default_rng(0)
    ddf = synth.diffeomorphic_ddf(rng, SHAPE, 8.0)
    grads = [np.gradient(ddf[i]) for i in range(3)]
    jac = np.stack([np.stack([grads[i][j] + (i == j) for j in range(3)], -1) for i in range(3)], -2)
    assert np.linalg.det(jac).min() > 0
    bspline = synth.bspline_ddf(rng, SHAPE, 8.0)
    assert np.isclose(np.linalg.norm(bspline, axis=0).max(), 8.0, rtol=1e-4)
    with pytest.raises(ValueError, match="family must be one of"):
        synth.make_pair(synth.relabel(label_map()), rng, "other")


def test_cli_writes_pairs_and_datalists(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-20, -24, -20]
    for i, name in enumerate(synth.TRAIN_MAPS + synth.HELDOUT_MAPS):
        nib.save(nib.Nifti1Image(label_map(i), affine), maps / f"{name}.nii.gz")
    out = tmp_path / "pairs"
    out.mkdir()
    real = {"training": [{"name": "real0"}], "validation": [{"name": "real1"}], "test": [{"name": "real2"}]}
    (out / "datalist.json").write_text(json.dumps(real))
    common = ["--out", str(out), "--label-maps", str(maps)]
    assert synth.main([*common, "--family", "train", "--n-pairs", "2"]) == 0
    assert synth.main([*common, "--family", "heldout"]) == 0
    train = json.loads((out / "datalist_synth_train.json").read_text())
    assert [len(train[k]) for k in ("training", "validation", "test")] == [2, synth.N_VALIDATION, synth.N_TEST]
    heldout = json.loads((out / "datalist_synth_heldout.json").read_text())
    assert list(k for k in heldout if k in ("training", "validation", "test")) == ["test"]
    assert len(heldout["test"]) == synth.N_TEST
    assert {i["name"].split("_pair")[0] for i in heldout["test"]} == {"heldout"}
    assert all(any(m.removesuffix("_labels") in i["name"] for m in synth.HELDOUT_MAPS) for i in heldout["test"])
    mix = json.loads((out / "datalist_mix.json").read_text())
    assert [i["name"] for i in mix["training"]] == ["real0"] + [i["name"] for i in train["training"]]
    assert mix["test"] == real["test"]
    for item in train["training"] + heldout["test"]:
        image = nib.load(str(out / item["moving_image"]))
        label = nib.load(str(out / item["moving_label"]))
        assert image.shape == label.shape == SHAPE and np.allclose(image.affine, affine)
    # the same seed gives the same files
    again = tmp_path / "again"
    assert synth.main(["--out", str(again), "--label-maps", str(maps), "--family", "heldout"]) == 0
    first = out / heldout["test"][0]["moving_image"]
    assert first.read_bytes() == (again / heldout["test"][0]["moving_image"]).read_bytes()


def test_cli_names_missing_label_maps(tmp_path):
    with pytest.raises(SystemExit, match="label maps missing.*make sr-data"):
        synth.main(["--out", str(tmp_path), "--label-maps", str(tmp_path / "none"), "--family", "heldout"])
