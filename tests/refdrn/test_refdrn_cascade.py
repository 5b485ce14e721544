"""The REM -> backbone cascade: frozen REM in eval mode, gradients through REM, training moves the backbone only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import load_bundle_scripts

torch.set_num_threads(1)


networks = load_bundle_scripts("refdrn", "networks")
losses = load_bundle_scripts("refdrn", "losses")


def _tiny_rem() -> nn.Module:
    """Stand-in for REM (the real one lives in the rem_sr bundle): k=4 conv, batch norm (has buffers), 1x1 conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 2, kernel_size=4, padding="same"),
        nn.BatchNorm3d(2),
        nn.ReLU(),
        nn.Conv3d(2, 1, kernel_size=1),
    )


def _pair(shape=(1, 1, 12, 12, 12), requires_grad=False):
    g = torch.Generator().manual_seed(4)
    moving = torch.rand(shape, generator=g)
    fixed = torch.roll(moving, shifts=1, dims=2) + 0.05 * torch.rand(shape, generator=g)
    return moving.requires_grad_(requires_grad), fixed


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_rem_training_moves_backbone_only():
    rem = _tiny_rem()
    backbone = networks.FDRN(channels=(4, 8, 8), num_res=1, return_aux=True)
    cascade = networks.RegistrationCascade(backbone, rem)
    loss_fn = losses.ReFDRNLoss(rem=rem, kernel_size=3, aux_ddf_weight=1.0)
    rem_before, backbone_before = _snapshot(rem), _snapshot(backbone)
    assert all(not p.requires_grad for p in rem.parameters())

    cascade.train()
    assert cascade.training and backbone.training and not rem.training
    opt = torch.optim.Adam(cascade.parameters(), lr=1e-2)  # all parameters: the frozen ones must stay put
    moving, fixed = _pair()
    for it in range(3):
        opt.zero_grad()
        out = cascade.register(moving, fixed)
        assert set(out) == {"ddf", "sr_moving", "sr_fixed", "aux_ddf"}
        result = loss_fn(out["ddf"], moving, fixed, out["sr_moving"], out["sr_fixed"], out["aux_ddf"], iteration=it)
        result["loss"].backward()
        assert all(p.grad is None for p in rem.parameters())
        opt.step()

    cascade.train()
    assert not rem.training  # still eval after train()
    for k, v in _snapshot(rem).items():  # weights AND batch-norm running stats untouched
        assert torch.equal(v, rem_before[k]), k
    after = _snapshot(backbone)
    changed = [k for k in after if not torch.equal(after[k], backbone_before[k])]
    assert len(changed) == len(after), set(after) - set(changed)
    assert {p for p in cascade.trainable_parameters()} == set(backbone.parameters())


def test_gradients_flow_through_frozen_rem_to_its_input():
    rem = _tiny_rem()
    cascade = networks.RegistrationCascade(networks.FDRN(channels=(4, 8, 8), num_res=1, init_std=0.1), rem).train()
    moving, fixed = _pair(requires_grad=True)

    out = cascade.register(moving, fixed)
    out["ddf"].pow(2).sum().backward()  # ddf -> backbone -> REM -> input
    assert moving.grad is not None and moving.grad.abs().sum().item() > 0

    moving.grad = None
    out = cascade.register(moving, fixed)
    result = losses.ReFDRNLoss(rem=rem, kernel_size=3)(out["ddf"], moving, fixed, out["sr_moving"], out["sr_fixed"])
    result["loss"].backward()
    assert moving.grad is not None and moving.grad.abs().sum().item() > 0
    assert all(p.grad is None for p in rem.parameters())


def test_cascade_without_rem_and_with_voxelmorph():
    moving, fixed = _pair((1, 1, 16, 16, 16))
    plain = networks.RegistrationCascade(networks.voxelmorph_vm2(), rem=None)
    with torch.no_grad():
        out = plain.register(moving, fixed)
    assert set(out) == {"ddf", "sr_moving", "sr_fixed"}  # no aux from VoxelMorph
    assert torch.equal(out["sr_moving"], moving) and torch.equal(out["sr_fixed"], fixed)
    assert out["ddf"].shape == (1, 3, 16, 16, 16)

    rem = _tiny_rem()
    cascade = networks.RegistrationCascade(networks.FDRN(channels=(4, 8, 8), num_res=1), rem)
    with torch.no_grad():
        out = cascade.register(torch.cat([moving, fixed]), torch.cat([fixed, moving]))  # batch of 2 pairs
    assert "aux_ddf" not in out and out["ddf"].shape == (2, 3, 16, 16, 16)
    # REM is applied to each image separately: same result as running REM on one image at a time
    with torch.no_grad():
        torch.testing.assert_close(out["sr_moving"][1:], rem(fixed))
        torch.testing.assert_close(out["sr_fixed"][:1], rem(fixed))
    with pytest.raises(ValueError):
        cascade.register(moving, fixed[..., :8])


def test_rem_weights_are_not_part_of_the_cascade_state_dict():
    """The cascade's checkpoint holds the backbone only: rem_sr's weights are loaded, never copied."""
    rem = _tiny_rem()
    cascade = networks.RegistrationCascade(networks.FDRN(channels=(4, 8, 8)), rem=rem)
    keys = list(cascade.state_dict())
    assert keys and all(k.startswith("backbone.") for k in keys)
    assert all(p.requires_grad for p in cascade.parameters())
    cascade.to(torch.float64)
    assert next(rem.parameters()).dtype == torch.float64  # .to() still reaches REM
    x = torch.rand(1, 2, 16, 16, 16, dtype=torch.float64)
    assert cascade(x).shape == (1, 3, 16, 16, 16)


def test_training_dataset_on_disk_is_computed_once_and_keyed_by_scale_and_rem(tmp_path):
    """scripts.data.training_dataset: CacheDataset by default; with a cache folder, PersistentDataset filled at
    construction, read back by a second run, and kept apart for another scale or REM."""
    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import Lambdad

    data = load_bundle_scripts("refdrn", "data")
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    items = [{"x": torch.full((1, 2, 2, 2), float(i))} for i in range(3)]
    transform = Lambdad(keys="x", func=double)
    assert isinstance(data.training_dataset(items, transform), CacheDataset)
    calls.clear()
    first = data.training_dataset(items, transform, cache_dir=str(tmp_path), scale=4, rem=None)
    assert isinstance(first, PersistentDataset) and len(calls) == 3  # filled before training
    again = data.training_dataset(items, transform, cache_dir=str(tmp_path), scale=4, rem=None)
    assert len(calls) == 3 and torch.equal(again[2]["x"], torch.full((1, 2, 2, 2), 4.0))
    rem = torch.nn.Conv3d(1, 1, 1)
    keys = {data.cache_key(4, None), data.cache_key(2, None), data.cache_key(4, rem)}
    with torch.no_grad():
        rem.weight += 1
    keys.add(data.cache_key(4, rem))
    assert len(keys) == 4
    data.training_dataset(items, transform, cache_dir=str(tmp_path), scale=2, rem=None)
    assert len(calls) == 6 and len(list(tmp_path.iterdir())) == 2
