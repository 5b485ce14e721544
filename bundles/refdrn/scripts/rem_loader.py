"""Load the frozen REM from the `rem_sr` bundle: its architecture from rem_sr's own inference config,
its weights from rem_sr's models/model.pt. The weights are read in place, never copied into this bundle."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from .checks import BundleInputError


def _load_rem_class(rem_bundle: Path):
    path = rem_bundle / "scripts" / "networks.py"
    # a private module name: this bundle has its own `scripts` package
    spec = importlib.util.spec_from_file_location("rem_sr_bundle_networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.REM


def load_rem(rem_bundle: str, weights: str | None = None, enabled: bool = True) -> nn.Module | None:
    """The frozen, eval-mode REM of `rem_bundle` (None when `enabled` is false: the identity, i.e. the
    plain backbone on trilinear-upsampled input).

    Raises one BundleInputError naming the path when the bundle, its config, its network code or its
    weights are missing or do not fit together.
    """
    if isinstance(enabled, str):  # `--use_rem false` reaches the config as the string "false"
        if enabled.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise BundleInputError(f"use_rem must be true or false, got {enabled!r}")
        enabled = enabled.strip().lower() in ("true", "1", "yes")
    if not enabled:
        return None
    root = Path(rem_bundle)
    config_path = root / "configs" / "inference.json"
    weights_path = Path(weights) if weights else root / "models" / "model.pt"
    problem = None
    if not config_path.is_file() or not (root / "scripts" / "networks.py").is_file():
        problem = f"{root}: not a rem_sr bundle (needs configs/inference.json and scripts/networks.py)"
    elif not weights_path.is_file():
        problem = f"{weights_path}: rem_sr weights not found (train rem_sr or set --rem_bundle/--rem_weights)"
    if problem:
        raise BundleInputError(f"cannot load the frozen REM: {problem}")
    config = json.loads(config_path.read_text())
    try:
        rem = _load_rem_class(root)(k=int(config["rem_k"]), n=int(config["rem_n"]), variant=config["rem_variant"])
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        rem.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise BundleInputError(f"cannot load the frozen REM from {weights_path}: incompatible with the "
                               f"architecture in {config_path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    rem.requires_grad_(False)
    return rem.eval()
