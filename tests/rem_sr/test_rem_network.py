import pytest
import torch

from tests.helpers import BUNDLES, load_bundle_scripts

networks = load_bundle_scripts("rem_sr", "networks")

PAPER_COUNTS = {(8, 8): 14_329, (16, 8): 56_305, (16, 16): 111_729, (32, 8): 223_201, (64, 8): 888_769}


@pytest.mark.parametrize("variant", networks.VARIANTS)
@pytest.mark.parametrize("k,n", list(PAPER_COUNTS))
def test_parameter_counts_match_paper(k, n, variant):
    net = networks.REM(k=k, n=n, variant=variant)
    assert sum(p.numel() for p in net.parameters()) == PAPER_COUNTS[(k, n)]


@pytest.mark.parametrize("variant", networks.VARIANTS)
def test_shape_is_preserved(variant):
    x = torch.rand(2, 1, 11, 12, 13)
    assert networks.REM(k=4, n=2, variant=variant)(x).shape == x.shape


def test_variants_differ_with_same_weights():
    torch.manual_seed(0)
    base = networks.REM(k=4, n=3, variant="I")
    x = torch.rand(1, 1, 10, 10, 10)
    outputs = {}
    for v in networks.VARIANTS:
        net = networks.REM(k=4, n=3, variant=v)
        net.load_state_dict(base.state_dict())
        outputs[v] = net(x)
    assert not torch.allclose(outputs["I"], outputs["II"])
    assert not torch.allclose(outputs["II"], outputs["III"])
    # Variant I is exactly Variant II's image-domain counterpart: I - x equals the no-skip network
    plain = base.tail(
        torch.relu(base.body[2](torch.relu(base.body[1](torch.relu(base.body[0](torch.relu(base.head(x))))))))
    )
    assert torch.allclose(outputs["I"] - x, plain, atol=1e-6)


def test_variant_one_with_zero_tail_is_identity():
    net = networks.REM(variant="I")
    torch.nn.init.zeros_(net.tail.weight)
    torch.nn.init.zeros_(net.tail.bias)
    x = torch.rand(1, 1, 8, 9, 10)
    assert torch.equal(net(x), x)


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        networks.REM(variant="IV")
    with pytest.raises(ValueError):
        networks.REM(k=0)


def test_default_config_is_variant_one_k16n8():
    import json

    cfg = json.loads((BUNDLES / "rem_sr" / "configs" / "inference.json").read_text())
    assert (cfg["rem_variant"], cfg["rem_k"], cfg["rem_n"]) == ("I", 16, 8)
