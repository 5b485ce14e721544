"""FDRN and VoxelMorph VM-2 backbones: shapes, sizes, initial field (tiny CPU inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import load_bundle_scripts

torch.set_num_threads(1)


networks = load_bundle_scripts("refdrn", "networks")


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 24, 28)])
def test_fdrn_shapes(shape):
    net = networks.FDRN()
    x = torch.rand(1, 2, *shape)
    with torch.no_grad():
        ddf = net(x)
        ddf2, aux = net(x, return_aux=True)
    assert ddf.shape == (1, 3, *shape)
    torch.testing.assert_close(ddf, ddf2)
    assert aux.shape == (1, 3, *[-(-s // 16) for s in shape])  # coarsest grid 1/16, ceil when padded
    # the initial field is ~identity (small-init flow head)
    assert ddf.abs().max().item() < 1e-2


def test_fdrn_constructor_options():
    net = networks.FDRN(channels=(4, 8, 8), num_res=1, init_std=0.0, return_aux=True)
    assert net.levels == 2 and net.size_multiple == 4
    x = torch.rand(2, 2, 10, 12, 13)
    with torch.no_grad():
        ddf, aux = net(x)
        assert net(x, return_aux=False).shape == (2, 3, 10, 12, 13)
    assert ddf.shape == (2, 3, 10, 12, 13) and aux.shape == (2, 3, 3, 3, 4)
    assert ddf.abs().max().item() == 0.0 and aux.abs().max().item() == 0.0  # zero init: exact identity
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 8, 8, 8))


def test_fdrn_skips_are_additive_and_size_is_compact():
    net = networks.FDRN()
    n = networks.count_parameters(net)
    assert n == 592_998  # default config (documented in the model card)
    assert 200_000 < n < 1_000_000
    # every decoder conv maps c(l+1) -> c(l): no concatenated (c(l+1) + c(l)) inputs anywhere
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv3d)):
        assert conv.in_channels in set(net.channels) | {2}
    # the additive skip is really used: perturbing the stem changes the output through the skip
    torch.manual_seed(0)
    net = networks.FDRN(channels=(4, 8, 8), num_res=1, init_std=0.1)
    x = torch.rand(1, 2, 8, 8, 8, requires_grad=True)
    net(x).sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 24, 28)])
def test_voxelmorph_vm2_shapes(shape):
    net = networks.voxelmorph_vm2()
    with torch.no_grad():
        ddf = net(torch.rand(1, 2, *shape))
    assert ddf.shape == (1, 3, *shape)
    assert ddf.abs().max().item() < 1e-2


def test_voxelmorph_vm2_parameter_count():
    n = networks.count_parameters(networks.voxelmorph_vm2())
    assert abs(n - 327_000) / 327_000 < 0.05
    assert n == 327_331  # reference VoxelMorph [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]
