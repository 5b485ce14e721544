"""rem_sr's SynthSR-style synthesis from label maps and the real/synthetic training mix."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.helpers import load_bundle_scripts

synthesis = load_bundle_scripts("rem_sr", "synthesis")


def _labels() -> torch.Tensor:
    labels = torch.zeros(1, 20, 20, 20, dtype=torch.int16)
    labels[:, 4:16, 4:16, 4:16] = 3
    labels[:, 8:12, 8:12, 8:12] = 250
    labels[:, 4:8, 12:16, 4:16] = 7
    return labels


def test_each_label_gets_one_random_intensity_and_the_background_stays_zero():
    t = synthesis.RandLabelSynthd("labels", std_range=(0, 0), fwhm_range=(0, 0))
    t.set_random_state(1)
    labels = _labels()
    images = []
    for _ in range(3):
        out = t({"labels": MetaTensor(labels, meta={"filename_or_obj": "l.nii.gz"})})
        image = out["image"]
        assert "labels" not in out and image.dtype == torch.float32 and image.meta["filename_or_obj"] == "l.nii.gz"
        for i in (3, 7, 250):
            values = image[labels == i]
            assert torch.all(values == values[0]) and 0.05 <= float(values[0]) <= 1.0
        assert torch.all(image[labels == 0] == 0)
        images.append(image)
    assert not torch.equal(images[0], images[1])  # a new contrast every call


def test_texture_and_partial_volume_blur():
    labels = _labels()
    textured = synthesis.RandLabelSynthd("labels", std_range=(0.03, 0.03), fwhm_range=(0, 0))
    textured.set_random_state(0)
    image = textured({"labels": labels})["image"]
    assert float(image[labels == 3].std()) == pytest.approx(0.03, rel=0.2)
    blurred = synthesis.RandLabelSynthd("labels", std_range=(0, 0), fwhm_range=(3, 3))
    blurred.set_random_state(0)
    image = blurred({"labels": labels})["image"]
    edge = image[0, 3:6, 10, 10]  # across the border of label 3 at index 4
    assert 0 < float(edge[0]) and len(torch.unique(edge)) == 3  # the edge is spread over several voxels
    assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_real_images_pass_through_and_bad_ranges_are_rejected():
    t = synthesis.RandLabelSynthd("labels")
    image = torch.rand(1, 8, 8, 8)
    out = t({"image": image})
    assert out["image"] is image
    with pytest.raises(ValueError, match="mean_range"):
        synthesis.RandLabelSynthd("labels", mean_range=(0.9, 0.1))


def test_foreground_weight_of_images_and_label_maps():
    w = synthesis.ForegroundWeightd(["image", "labels"])
    image = torch.tensor([[[[0.0, 0.5, -0.1]]]])
    assert torch.equal(w({"image": image})["weight"], torch.tensor([[[[0.0, 0.5, 0.0]]]]))
    assert torch.equal(w({"labels": torch.tensor([[[[0, 3, 250]]]])})["weight"], torch.tensor([[[[0.0, 1.0, 1.0]]]]))
    with pytest.raises(KeyError, match="neither"):
        w({"mask": image})


def test_mix_sampler_draws_the_configured_fraction_of_synthetic_samples():
    items = [{"image": "a"}, {"image": "b"}, {"labels": "c"}, {"labels": "d"}, {"labels": "e"}]
    weights = synthesis.mix_weights(items, 0.7)
    assert sum(weights) == pytest.approx(1.0)
    assert sum(w for w, i in zip(weights, items) if "labels" in i) == pytest.approx(0.7)
    sampler = synthesis.mix_sampler(items, 0.7, num_samples=4000)
    torch.manual_seed(0)
    drawn = np.array(list(sampler))
    assert len(drawn) == 4000 and np.mean(drawn >= 2) == pytest.approx(0.7, abs=0.03)
    assert synthesis.mix_weights(items, 0.0)[2:] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no 'labels' items"):
        synthesis.mix_weights(items[:2], 0.5)
    with pytest.raises(ValueError, match="only label maps"):
        synthesis.mix_weights(items[2:], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        synthesis.mix_weights(items, 1.5)
