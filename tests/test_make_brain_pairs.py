"""Unit tests of tools/make_brain_pairs.py (the full build needs the PyPI wheels; these test its pieces)."""

import numpy as np
import pytest

from tools import make_brain_pairs as pairs


def test_fit_affine_recovers_a_known_affine():
    rng = np.random.default_rng(0)
    truth = np.eye(4)
    truth[:3, :3] = np.array([[1.1, 0.05, 0.0], [-0.03, 0.95, 0.1], [0.0, 0.02, 1.05]])
    truth[:3, 3] = [3.0, -7.0, 12.0]
    src = rng.uniform(-60, 60, (40, 3))
    dst = (truth @ np.c_[src, np.ones(40)].T).T[:, :3]
    assert np.allclose(pairs.fit_affine(src, dst), truth, atol=1e-8)


def test_label_centroids_are_in_world_coordinates():
    labels = np.zeros((10, 10, 10), np.int16)
    labels[2:4, 2:4, 2:4] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 0, 5]
    assert np.allclose(pairs.label_centroids(labels, affine, np.array([1])), [[-5.0, 5.0, 10.0]])


def test_synthesized_t1_has_t1_contrast_ordering():
    labels = np.zeros((40, 40, 40), np.int16)
    labels[5:35, 5:35, 5:35] = 1  # a cortical shell ...
    labels[9:31, 9:31, 9:31] = 0  # ... around unlabelled white matter
    labels[17:23, 17:23, 17:23] = 35  # a subcortical structure
    image, brain = pairs.synthesize_t1(labels, {1: "cortex", 35: "subcortex/brainstem"}, np.random.default_rng(1))
    wm, gm, deep = image[12, 12, 12], image[6, 20, 20], image[20, 20, 20]
    assert wm > deep > gm > 0 and image.max() <= 1 and image[0, 0, 0] == 0 and brain[20, 20, 20]


def test_random_deformation_is_smooth_bounded_and_warp_preserves_labels():
    rng = np.random.default_rng(2)
    field = pairs.random_deformation(rng, (32, 36, 28))
    magnitude = np.linalg.norm(field, axis=0)
    assert magnitude.max() == pytest.approx(pairs.MAX_DISPLACEMENT_MM, rel=1e-4)
    assert np.abs(np.diff(field, axis=1)).max() < 1.0  # smooth: no folding-scale jumps between neighbours
    labels = np.zeros((32, 36, 28), np.uint8)
    labels[8:24, 8:28, 6:22] = 3
    warped = pairs.warp(labels, field, order=0)
    assert set(np.unique(warped)) <= {0, 3}
    assert 0.7 < (warped == 3).sum() / (labels == 3).sum() < 1.3
    assert np.array_equal(pairs.warp(labels, np.zeros_like(field), order=0), labels)


def test_splits_keep_test_subjects_out_of_training():
    assert not set(pairs.TRAIN_DONORS) & set(pairs.TEST_DONORS)
    assert len(pairs.TEST_DONORS) >= 2
