import pytest
import torch

from tests.helpers import BUNDLES, load_bundle_scripts


def test_shipped_weights_load_strictly_on_cpu_and_enhance():
    networks = load_bundle_scripts("rem_sr", "networks")
    degradation = load_bundle_scripts("rem_sr", "degradation")
    state = torch.load(BUNDLES / "rem_sr" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    net = networks.REM(k=16, n=8, variant="I")
    net.load_state_dict(state, strict=True)
    net.eval()
    # a trained REM must not be the identity: it changes the trilinear input
    x = degradation.degrade(torch.rand(1, 24, 24, 24), 2)[None]
    with torch.no_grad():
        assert (net(x) - x).abs().mean() > 1e-4


@pytest.mark.parametrize("name", ["model_x2.pt"])
def test_the_per_degradation_weights_load_into_the_same_network_and_differ_from_the_default(name):
    networks = load_bundle_scripts("rem_sr", "networks")
    default = torch.load(BUNDLES / "rem_sr" / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = torch.load(BUNDLES / "rem_sr" / "models" / name, map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values())
    networks.REM(k=16, n=8, variant="I").load_state_dict(state, strict=True)
    assert any(not torch.equal(state[k], default[k]) for k in state)
