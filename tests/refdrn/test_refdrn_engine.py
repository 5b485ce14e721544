"""refdrn's RegistrationTrainStep honours the trainer's ``amp`` flag (autocast + GradScaler on CUDA only).

No GPU is needed: ``torch.autocast`` is replaced by a recorder, and the CUDA case mocks the step's device-type
check (``engine._device_type``), so the tensors themselves stay on the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from monai.inferers import SimpleInferer

from tests.helpers import load_bundle_scripts

torch.set_num_threads(1)


networks = load_bundle_scripts("refdrn", "networks")
losses = load_bundle_scripts("refdrn", "losses")
engine_module = load_bundle_scripts("refdrn", "engine")


class _AutocastRecorder:
    """Stands in for ``torch.autocast``: records ``(device_type, enabled)`` and whether a block is open."""

    calls: list[tuple[str, bool]] = []
    active: list[bool] = []

    def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled=None) -> None:
        self.device_type, self.enabled = device_type, bool(enabled)
        _AutocastRecorder.calls.append((device_type, self.enabled))

    def __enter__(self):
        _AutocastRecorder.active.append(self.enabled)
        return self

    def __exit__(self, *exc) -> bool:
        _AutocastRecorder.active.pop()
        return False


class _SpyNetwork(torch.nn.Module):
    """Wraps the cascade and records, for each forward, whether it ran inside an enabled autocast block."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.under_autocast: list[bool] = []

    def forward(self, *args, **kwargs):
        self.under_autocast.append(any(_AutocastRecorder.active))
        return self.net(*args, **kwargs)


class _SpyScaler:
    """A GradScaler look-alike (scale 1) that records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls.append("scale")
        return loss

    def unscale_(self, optimizer) -> None:
        self.calls.append("unscale_")

    def step(self, optimizer) -> None:
        self.calls.append("step")
        optimizer.step()

    def update(self) -> None:
        self.calls.append("update")


@pytest.fixture
def autocast_recorder(monkeypatch):
    _AutocastRecorder.calls = []
    _AutocastRecorder.active = []
    monkeypatch.setattr(engine_module.torch, "autocast", _AutocastRecorder)
    return _AutocastRecorder


def _engine(amp: bool, scaler=None):
    torch.manual_seed(0)
    net = _SpyNetwork(networks.RegistrationCascade(networks.FDRN(channels=(4, 8), num_res=1, return_aux=True)))
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(1, 1, 8, 8, 8, generator=g) for k in ("moving_image_lr", "fixed_image_lr")}
    batch["moving_sr"], batch["fixed_sr"] = batch["moving_image_lr"].clone(), batch["fixed_image_lr"].clone()
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu"), iteration=1),
        network=net,
        inferer=SimpleInferer(),
        optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        amp=amp,
        scaler=scaler,
    )
    step = engine_module.RegistrationTrainStep(losses.ReFDRNLoss(kernel_size=3, aux_ddf_weight=1.0), grad_clip_norm=1.0)
    return engine, step, batch


def _params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


def test_amp_on_cuda_runs_the_network_under_autocast(monkeypatch, autocast_recorder):
    monkeypatch.setattr(engine_module, "_device_type", lambda device: "cuda", raising=False)
    scaler = _SpyScaler()
    engine, step, batch = _engine(amp=True, scaler=scaler)
    before = _params(engine.network)
    out = step(engine, batch)
    assert ("cuda", True) in autocast_recorder.calls
    assert engine.network.under_autocast == [True]  # the forward pass itself is inside the autocast block
    assert scaler.calls == ["scale", "unscale_", "step", "update"]  # the trainer's GradScaler drives the step
    assert not torch.equal(before, _params(engine.network))
    assert set(out) == {"loss", "main", "aux", "reg", "aux_ddf_loss", "aux_ddf_weight"}
    assert all(isinstance(v, float) for v in out.values())


def test_amp_off_on_cuda_keeps_full_precision(monkeypatch, autocast_recorder):
    monkeypatch.setattr(engine_module, "_device_type", lambda device: "cuda", raising=False)
    scaler = _SpyScaler()
    engine, step, batch = _engine(amp=False, scaler=scaler)
    step(engine, batch)
    assert all(not enabled for _, enabled in autocast_recorder.calls)
    assert engine.network.under_autocast == [False]
    assert scaler.calls == []


def test_amp_is_ignored_on_cpu(autocast_recorder):
    scaler = _SpyScaler()
    engine, step, batch = _engine(amp=True, scaler=scaler)
    before = _params(engine.network)
    out = step(engine, batch)
    assert all(not enabled for _, enabled in autocast_recorder.calls)
    assert engine.network.under_autocast == [False]
    assert scaler.calls == []  # plain backward / optimizer.step on CPU
    assert not torch.equal(before, _params(engine.network))
    assert out["loss"] == pytest.approx(
        out["main"] + 10.0 * out["aux"] + 1e-8 * out["reg"] + out["aux_ddf_weight"] * out["aux_ddf_loss"], rel=1e-5
    )


def test_amp_flag_helper_reads_the_engine():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine_module._amp(SimpleNamespace(amp=True), cuda) is True
    assert engine_module._amp(SimpleNamespace(amp=False), cuda) is False
    assert engine_module._amp(SimpleNamespace(), cuda) is False
    assert engine_module._amp(SimpleNamespace(amp=True), cpu) is False
