"""Load the frozen REM from the `rem_sr` bundle: its architecture from rem_sr's own inference config,
its weights from rem_sr's models/model.pt. The weights are read in place, never copied into this bundle."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from .common import BundleInputError, config_flag


def _load_rem_class(rem_bundle: Path):
    """The ``REM`` class of ``<rem_bundle>/scripts/networks.py``, imported under a private module name."""
    path = rem_bundle / "scripts" / "networks.py"
    # a private module name: this bundle has its own `scripts` package
    spec = importlib.util.spec_from_file_location("rem_sr_bundle_networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.REM


def load_rem(rem_bundle: str, weights: str | None = None, enabled: bool = True) -> nn.Module | None:
    """
    Load the frozen, eval-mode REM of the ``rem_sr`` bundle for the ReFDRN cascade.

    The architecture (``rem_k``, ``rem_n``, ``rem_variant``) is read from ``<rem_bundle>/configs/inference.json``
    and the class from ``<rem_bundle>/scripts/networks.py``; the weights are loaded in place (``strict=True``,
    ``weights_only=True``) and never copied into this bundle. REM is pretrained and frozen in the cascade (K. Sun
    and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section IV-B.2).

    Args:
        rem_bundle: path of the ``rem_sr`` bundle.
        weights: path of the REM weights; ``None`` or ``""`` means ``<rem_bundle>/models/model.pt``.
        enabled: ``False`` (or a string that ``monai.utils.str2bool`` reads as false) returns ``None``: the
            identity, i.e. the plain backbone on the trilinear-upsampled input (the paper's "↓↑" baseline).

    Returns:
        the REM module on the CPU, in eval mode with ``requires_grad=False``, or ``None`` when disabled.

    Raises:
        BundleInputError: (a ``ValueError``) with one message naming the path, when ``enabled`` is a string that
            is not a boolean, or the bundle, its config, its network code or its weights are missing or do not
            fit together.
    """
    if not config_flag(enabled, "use_rem"):  # `--use_rem false` reaches the config as the string "false"
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
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise BundleInputError(
            f"cannot load the frozen REM from {weights_path}: incompatible with the "
            f"architecture in {config_path} ({reason})"
        ) from None
    rem.requires_grad_(False)
    return rem.eval()
