"""F3RNet network: parameter counts vs. the paper (Table 2), F3D placement, shapes, padding/cropping, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.f3rnet.bundle_import import load_f3rnet

torch.set_num_threads(1)

networks = load_f3rnet("networks")
F3RNet = networks.F3RNet

# Table 2 of the paper (millions of parameters), kept here independently of the module's own constant.
PAPER_M = {
    "none": 0.746,
    "all": 0.236,
    "encoder": 0.488,
    "decoder": 0.544,
    "fr": 0.697,
    "ms": 0.286,
    "all_more_mrb": 0.296,
}
VARIANTS = list(PAPER_M)


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    return {v: networks.count_parameters(F3RNet(f3d=v)) for v in VARIANTS}


def test_variant_list_matches_the_paper():
    assert set(networks.F3D_VARIANTS) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_within_5_percent_of_paper(counts, variant):
    paper = PAPER_M[variant] * 1e6
    assert abs(counts[variant] / paper - 1) <= 0.05, (variant, counts[variant], paper)


def test_parameter_counts_keep_the_paper_order(counts):
    paper_order = sorted(VARIANTS, key=lambda v: PAPER_M[v], reverse=True)
    ours_order = sorted(VARIANTS, key=lambda v: counts[v], reverse=True)
    assert ours_order == paper_order
    assert paper_order == ["none", "fr", "decoder", "encoder", "all_more_mrb", "ms", "all"]


def test_count_parameters_counts_trainable_parameters():
    lin = nn.Linear(3, 4)
    assert networks.count_parameters(lin) == 16
    lin.bias.requires_grad_(False)
    assert networks.count_parameters(lin, trainable_only=True) == 12
    assert networks.count_parameters(lin) == 16


def _kernels(module: nn.Module) -> set[tuple[int, ...]]:
    return {tuple(m.kernel_size) for m in module.modules() if isinstance(m, nn.Conv3d)}


def test_f3d_placement():
    full, fact = (3, 3, 3), {(3, 3, 1), (1, 1, 3)}
    none = F3RNet("none")
    assert _kernels(none) == {full, (1, 1, 1)}
    every = F3RNet("all")
    # only the final DDF conv stays 3x3x3; the MRB 1x1x1 convs are never factorised
    assert [m for m in every.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == full] == [every.flow]
    assert fact <= _kernels(every)
    enc = F3RNet("encoder")
    assert _kernels(enc.encoder) - {(1, 1, 1)} == fact and _kernels(enc.ms_stem) == fact
    assert _kernels(enc.decoder) == {full, (1, 1, 1)} and _kernels(enc.fr_pre) == {full}
    dec = F3RNet("decoder")
    assert _kernels(dec.decoder) - {(1, 1, 1)} == fact and _kernels(dec.encoder) == {full, (1, 1, 1)}
    fr = F3RNet("fr")
    assert _kernels(fr.head) == _kernels(fr.fr_pre) == _kernels(fr.fr_post) == _kernels(fr.tail) == fact
    assert _kernels(fr.encoder) == _kernels(fr.decoder) == {full, (1, 1, 1)}
    ms = F3RNet("ms")
    assert _kernels(ms.fr_pre) == {full} and _kernels(ms.decoder) - {(1, 1, 1)} == fact


def test_mrb_counts():
    assert (len(F3RNet("none").encoder), len(F3RNet("none").decoder)) == (4, 3)
    assert len(F3RNet("all").bottom) == 0
    extra = F3RNet("all_more_mrb")
    assert len(extra.bottom) == 2 and all(m.factor == 16 for m in extra.bottom)
    assert [m.factor for m in extra.encoder] == [2, 4, 8, 16]
    assert [m.factor for m in extra.decoder] == [8, 4, 2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shape_multiple_of_16(variant):
    net = F3RNet(variant).eval()
    with torch.no_grad():
        ddf = net(torch.rand(1, 2, 16, 16, 16))
    assert ddf.shape == (1, 3, 16, 16, 16)
    assert torch.isfinite(ddf).all()


@pytest.mark.parametrize("variant", ["none", "all_more_mrb"])
def test_output_shape_not_multiple_of_16(variant):
    net = F3RNet(variant).eval()
    with torch.no_grad():
        ddf = net(torch.rand(2, 2, 20, 24, 18))
    assert ddf.shape == (2, 3, 20, 24, 18)


def test_padding_is_replicate_then_crop():
    torch.manual_seed(0)
    net = F3RNet("all").eval()
    x = torch.rand(1, 2, 13, 16, 10)
    with torch.no_grad():
        out = net(x)
        ref = net(F.pad(x, (0, 6, 0, 0, 0, 3), mode="replicate"))[:, :, :13, :16, :10]
    assert out.shape == (1, 3, 13, 16, 10)
    torch.testing.assert_close(out, ref)


def test_zero_padding_option():
    net = F3RNet("all", pad_mode="constant").eval()
    with torch.no_grad():
        assert net(torch.rand(1, 2, 9, 17, 16)).shape == (1, 3, 9, 17, 16)


def test_initial_field_is_near_zero_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = F3RNet("none")
    ddf = net(torch.rand(1, 2, 16, 16, 16))
    assert ddf.abs().max() < 1e-2
    ddf.pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_invalid_variant_raises_value_error_listing_valid_ones():
    with pytest.raises(ValueError, match="all_more_mrb") as err:
        F3RNet(f3d="half")
    for v in VARIANTS:
        assert v in str(err.value)


def test_wrong_input_channels_raise():
    with pytest.raises(ValueError, match="moving and fixed"):
        F3RNet("all")(torch.rand(1, 1, 16, 16, 16))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in torch 2.13
def test_network_is_torchscript_scriptable():
    net = F3RNet("all").eval()
    scripted = torch.jit.script(net)
    x = torch.rand(1, 2, 20, 16, 18)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
