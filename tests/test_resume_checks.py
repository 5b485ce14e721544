"""Issue 13, kind 9: resuming or fine-tuning from the wrong file.

``--resume_from models/model.pt`` (a plain state dict) or a checkpoint of another architecture gave a traceback of
33-39 frames that never named the file. Every train config (and multi_gpu_train.json) now checks ``resume_from`` and
``pretrained_weights`` first in its ``run`` list (``common.check_resume_checkpoint``, ``common.check_weights``), before
any data is loaded, with one message naming the file; refdrn and f3rnet_ct_mri gained ``--pretrained_weights``.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import BUNDLES, load_bundle_scripts, make_pair_dataset, run_bundle

REM_WEIGHTS = BUNDLES / "rem_sr" / "models" / "model.pt"
ENTRIES = "model, optimizer, lr_scheduler, trainer"


def _run_in_process(bundle: str, configs: list[str], **overrides):
    from monai.bundle import run

    load_bundle_scripts(bundle, "common")
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    return run(
        config_file=files[0] if len(files) == 1 else files,
        bundle_root=str(BUNDLES / bundle),
        logging_file=False,
        **overrides,
    )


def _bundle_error(exc: BaseException) -> str:
    while exc is not None:
        if type(exc).__name__ == "BundleInputError":
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    raise AssertionError("no BundleInputError in the chain")


def _last_line(stderr: str) -> str:
    return [line for line in stderr.strip().splitlines() if line.strip()][-1]


def _training_checkpoint(network: torch.nn.Module, entries=("model", "optimizer", "lr_scheduler", "trainer")) -> dict:
    """What the train configs' CheckpointSaver writes: one state dict per entry."""
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    states = {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "trainer": {"epoch_length": 1, "max_epochs": 1, "iteration": 1},
    }
    return {k: states[k] for k in entries}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pair_dataset(tmp_path_factory.mktemp("pairs"))


# ------------------------------------------------------------------------------------------- the example
def test_rem_sr_resume_from_plain_weights_says_use_pretrained_weights(brain_data, tmp_path):
    """`--resume_from models/model.pt` on the command line: one line naming the file, nothing trained or saved."""
    result = run_bundle(
        "rem_sr",
        ["train.json"],
        {
            "resume_from": str(REM_WEIGHTS),
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist.json"),
            "ckpt_dir": str(tmp_path / "models"),
            "log_dir": str(tmp_path / "logs"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert _last_line(result.stderr).endswith(
        f"--resume_from {REM_WEIGHTS}: holds network weights only (a plain state dict), not a training checkpoint "
        f"with {ENTRIES}; to start training from these weights use --pretrained_weights {REM_WEIGHTS}"
    )
    assert "Traceback" not in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("events.out.tfevents*"))


# --------------------------------------------------------------------------------------------- other instances
def test_refdrn_resume_from_a_checkpoint_of_another_architecture(pairs, tmp_path):
    """A rem_sr training checkpoint given to refdrn: the network part names the file and the mismatch."""
    rem = load_bundle_scripts("rem_sr", "networks").REM(k=16, n=8)
    checkpoint = tmp_path / "checkpoint_final.pt"
    torch.save(_training_checkpoint(rem), checkpoint)
    with pytest.raises(Exception) as err:
        _run_in_process(
            "refdrn",
            ["train.json"],
            resume_from=str(checkpoint),
            dataset_dir=str(pairs),
            datalist=str(pairs / "datalist.json"),
            ckpt_dir=str(tmp_path / "models"),
            log_dir=str(tmp_path / "logs"),
        )
    message = _bundle_error(err.value)
    assert message.startswith(f"--resume_from {checkpoint}: weights do not match the configured network ")
    assert message.endswith(
        "Set --backbone, --fdrn_channels and --fdrn_num_res to the architecture the checkpoint was trained with."
    )
    assert not list((tmp_path / "models").glob("*.pt")) if (tmp_path / "models").exists() else True


def test_f3rnet_resume_checkpoint_without_trainer_state_and_plain_weights(pairs, tmp_path):
    """f3rnet_ct_mri: a checkpoint missing an entry its resume_loader restores; its own shipped weights as
    --resume_from; a wrong --pretrained_weights (new key) names the file."""
    common = dict(
        dataset_dir=str(pairs),
        datalist=str(pairs / "datalist.json"),
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "logs"),
    )
    networks = load_bundle_scripts("f3rnet_ct_mri", "networks")
    checkpoint = tmp_path / "no_trainer.pt"
    torch.save(_training_checkpoint(networks.F3RNet("none"), ("model", "optimizer")), checkpoint)
    with pytest.raises(Exception) as err:
        _run_in_process("f3rnet_ct_mri", ["train.json"], resume_from=str(checkpoint), **common)
    assert _bundle_error(err.value) == (
        f"--resume_from {checkpoint}: training checkpoint without 'trainer' (it has 'model', 'optimizer'); resume "
        "from a checkpoint this config's CheckpointSaver wrote, or use --pretrained_weights "
        f"{checkpoint} to start from its network weights"
    )
    shipped = BUNDLES / "f3rnet_ct_mri" / "models" / "model.pt"
    with pytest.raises(Exception) as err:
        _run_in_process("f3rnet_ct_mri", ["train.json"], resume_from=str(shipped), **common)
    assert _bundle_error(err.value) == (
        f"--resume_from {shipped}: holds network weights only (a plain state dict), not a training checkpoint with "
        f"model, optimizer, trainer; to start training from these weights use --pretrained_weights {shipped}"
    )
    with pytest.raises(Exception) as err:
        _run_in_process("f3rnet_ct_mri", ["train.json"], pretrained_weights=str(REM_WEIGHTS), **common)
    message = _bundle_error(err.value)
    assert message.startswith(f"{REM_WEIGHTS}: weights do not match the configured network F3RNet: ")
    assert message.endswith("F3RNet variant 'none': check --variant and the channel settings")


# ------------------------------------------------------------------------------------------------- the function
def test_check_resume_checkpoint_accepts_a_saver_checkpoint_and_refuses_the_rest(tmp_path):
    common = load_bundle_scripts("rem_sr", "common")
    rem = load_bundle_scripts("rem_sr", "networks").REM(k=4, n=2)
    optimizer = torch.optim.Adam(rem.parameters())
    good = tmp_path / "checkpoint_final.pt"
    torch.save(_training_checkpoint(rem), good)
    assert common.check_resume_checkpoint(str(good), rem, optimizer=optimizer) == str(good)

    missing = tmp_path / "nope.pt"
    with pytest.raises(common.BundleInputError, match=r"^--resume_from .*nope.pt: checkpoint file not found$"):
        common.check_resume_checkpoint(str(missing), rem)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(common.BundleInputError, match=r"^--resume_from .*junk.pt: not a loadable PyTorch checkpoint"):
        common.check_resume_checkpoint(str(junk), rem)
    # another optimiser setup (one parameter group more): the optimizer entry would not load
    other = torch.optim.Adam([{"params": list(rem.parameters())[:2]}, {"params": list(rem.parameters())[2:]}])
    with pytest.raises(common.BundleInputError, match=r"optimizer state holds parameter groups of \[\d+\] tensors"):
        common.check_resume_checkpoint(str(good), rem, optimizer=other)
    # a DDP-style "module." prefix in the model entry is accepted, as for the weights
    ddp = tmp_path / "ddp.pt"
    state = _training_checkpoint(rem)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    torch.save(state, ddp)
    assert common.check_resume_checkpoint(str(ddp), rem) == str(ddp)


def test_every_train_config_checks_resume_and_pretrained_before_loading_data():
    """The checks come first in every train config's run list, with the entries its resume_loader restores."""
    for bundle in ("rem_sr", "refdrn", "f3rnet_ct_mri"):
        train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
        loader_entries = list(train["train"]["resume_loader"]["load_dict"])
        assert "pretrained_weights" in train and "pretrained_loader" in train["train"]
        for config in ("train.json", "multi_gpu_train.json"):
            run = json.loads((BUNDLES / bundle / "configs" / config).read_text())["run"]
            targets = [e.get("_target_") if isinstance(e, dict) else e for e in run]
            first_data = next(i for i, t in enumerate(targets) if isinstance(t, str) and "@train#" in t)
            resume = targets.index("scripts.common.check_resume_checkpoint")
            weights = next(
                i for i, e in enumerate(run) if isinstance(e, dict) and e.get("path") == "@pretrained_weights"
            )
            assert resume < first_data and weights < first_data, (bundle, config)
            assert run[resume]["entries"] == loader_entries, (bundle, config)
