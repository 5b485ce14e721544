"""Every bundle's train.json, train.json + multi_gpu_train.json and inference.json as a MONAI
`ConfigWorkflow`, checked the way the MONAI model zoo checks its bundles (ci/unit_tests): initialize, then
`check_properties()` must report no missing required property (MONAI's TrainProperties / InferProperties,
monai/bundle/properties.py). In MONAI 1.6.1 check_properties() returns the list of missing required
properties plus optional ones defined with a wrong ID, and raises KeyError for a required ID absent from the
config; either way these tests fail.

Also the rank > 0 handler selection of multi_gpu_train.json: it must not depend on positions in
train#handlers (MONAI Label inserts a CheckpointLoader at position 0 before a multi-GPU run), and rank > 0
must not even build a TensorBoard handler (building one creates an event file in log_dir).

No training runs here: check_properties() builds the trainer / evaluator on tiny data and tiny networks
(the same overrides as the end-to-end tests). The multi-GPU configs run in-process in a one-process gloo
group; the real two-process runs are the torchrun tests of the end-to-end suites.
"""

from __future__ import annotations

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigWorkflow

from tests.f3rnet.test_f3rnet_bundle_e2e import TINY_NET as F3RNET_NET
from tests.f3rnet.test_f3rnet_bundle_e2e import TINY_TRAIN as F3RNET_TRAIN
from tests.f3rnet.test_f3rnet_bundle_e2e import phantoms  # noqa: F401 (fixture)
from tests.helpers import BUNDLES, load_bundle_scripts
from tests.refdrn.test_refdrn_bundle_e2e import TINY_NET as REFDRN_NET
from tests.refdrn.test_refdrn_bundle_e2e import TINY_TRAIN as REFDRN_TRAIN
from tests.refdrn.test_refdrn_bundle_e2e import pairs  # noqa: F401 (fixture)
from tests.rem_sr.test_rem_bundle_e2e import TINY_NET as REM_NET
from tests.rem_sr.test_rem_bundle_e2e import TINY_TRAIN as REM_TRAIN

BUNDLE_NAMES = ["rem_sr", "refdrn", "f3rnet_ct_mri"]
DATA_FIXTURE = {"rem_sr": "brain_data", "refdrn": "pairs", "f3rnet_ct_mri": "phantoms"}
# train#handlers attached on rank 0 only (console and TensorBoard output); everything else, above all the
# ValidationHandler (the DDP network's forward in validation is collective), runs on every rank
RANK0_ONLY_TRAIN_HANDLERS = {"ProgressBarHandler", "StatsHandler", "TensorBoardStatsHandler"}


def overrides(bundle: str, kind: str, data, out) -> dict:
    """Tiny data and tiny networks, as in the bundle's end-to-end tests; every output under `out`."""
    if kind == "train":
        tiny = {"rem_sr": REM_TRAIN, "refdrn": REFDRN_TRAIN, "f3rnet_ct_mri": F3RNET_TRAIN}[bundle]
        extra = {"ckpt_dir": str(out / "models"), "log_dir": str(out / "logs")}
        if bundle != "f3rnet_ct_mri":
            extra["datalist"] = str(data / "datalist.json")
    else:
        tiny = {"rem_sr": REM_NET, "refdrn": REFDRN_NET, "f3rnet_ct_mri": F3RNET_NET}[bundle]
        extra = {"ckpt_path": str(out / "models" / "model.pt"), "output_dir": str(out / "inference")}
        if bundle == "rem_sr":
            extra.update(datalist=str(data / "datalist_lr_x2.json"), scale=2, roi_size=[24, 24, 24])
    return {**tiny, "dataset_dir": str(data), **extra}


def workflow(
    bundle: str, configs: list[str], workflow_type: str, insert_handler: dict | None = None, **override
) -> ConfigWorkflow:
    """An initialized ConfigWorkflow of `configs` (merged in order, as `monai.bundle run` merges them)."""
    load_bundle_scripts(bundle, "checks")  # this bundle's `scripts` package first on sys.path
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type=workflow_type,
        logging_file=False,
        bundle_root=str(BUNDLES / bundle),
        **override,
    )
    if insert_handler is not None:  # what MONAI Label does to train#handlers before running the bundle
        wf.parser["train#handlers"].insert(0, insert_handler)
    wf.initialize()
    return wf


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, so multi_gpu_train.json's `initialize` (which keeps an existing group) and
    its DistributedDataParallel / DistributedSampler work in-process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'process_group'}", rank=0, world_size=1)
    yield
    idist.finalize()  # ignite may have cached the native distributed configuration: back to serial
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_config_has_every_required_property(bundle, request, tmp_path):
    data = request.getfixturevalue(DATA_FIXTURE[bundle])
    wf = workflow(bundle, ["train.json"], "train", **overrides(bundle, "train", data, tmp_path))
    assert wf.check_properties() == []
    # the trainer computes with the configured train#inferer
    assert wf.trainer.inferer is wf.train_inferer
    # val_interval iterations make one epoch, and the validation runs every val_interval iterations:
    # once at the end of every epoch
    validation = [h for h in wf.train_handlers if type(h).__name__ == "ValidationHandler"]
    assert len(validation) == 1 and validation[0].interval == wf.val_interval == wf.trainer.state.epoch_length
    assert validation[0].validator is wf.evaluator


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_inference_config_has_every_required_property(bundle, request, tmp_path):
    data = request.getfixturevalue(DATA_FIXTURE[bundle])
    wf = workflow(bundle, ["inference.json"], "infer", **overrides(bundle, "infer", data, tmp_path))
    assert wf.check_properties() == []


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_multi_gpu_train_config_has_every_required_property(bundle, request, tmp_path, one_process_group):
    data = request.getfixturevalue(DATA_FIXTURE[bundle])
    wf = workflow(bundle, ["train.json", "multi_gpu_train.json"], "train", **overrides(bundle, "train", data, tmp_path))
    assert wf.check_properties() == []
    assert isinstance(wf.parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
    assert wf.trainer.inferer is wf.train_inferer


def _attached_handlers(bundle, data, out, rank, monkeypatch, insert_handler=None):
    """Type names of the train / validation handlers multi_gpu_train.json attaches on `rank`, and whether a
    TensorBoard event file appeared in log_dir while they were built."""
    with monkeypatch.context() as patch:
        patch.setattr(dist, "get_rank", lambda group=None: rank)
        wf = workflow(
            bundle,
            ["train.json", "multi_gpu_train.json"],
            "train",
            insert_handler,
            **overrides(bundle, "train", data, out),
        )
        train = [type(h).__name__ for h in wf.parser.get_parsed_content("train#trainer#train_handlers")]
        val = wf.parser.get_parsed_content("validate#evaluator#val_handlers")
    val = None if val is None else [type(h).__name__ for h in val]
    return train, val, any((out / "logs").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_multi_gpu_rank_selection_survives_a_handler_inserted_at_position_0(
    bundle, request, tmp_path, monkeypatch, one_process_group
):
    """As MONAI Label does before a multi-GPU run: a CheckpointLoader at position 0 of train#handlers must run
    on every rank, and must not change which of the bundle's handlers rank > 0 drops."""
    data = request.getfixturevalue(DATA_FIXTURE[bundle])
    loader = {
        "_target_": "CheckpointLoader",
        "load_path": str(tmp_path / "pretrained.pt"),
        "load_dict": {"model": "$@network"},
        "strict": False,
    }
    seen = {}
    for rank in (0, 1):
        for inserted in (False, True):
            out = tmp_path / f"rank{rank}_{'inserted' if inserted else 'plain'}"
            seen[rank, inserted] = _attached_handlers(
                bundle, data, out, rank, monkeypatch, loader if inserted else None
            )
    rank0_train, rank0_val, rank0_events = seen[0, False]
    assert set(rank0_train) >= RANK0_ONLY_TRAIN_HANDLERS | {"ValidationHandler"}
    assert rank0_val == ["StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver"]
    assert rank0_events  # rank 0 logs to TensorBoard
    rank1_train, rank1_val, rank1_events = seen[1, False]
    assert rank1_train == [h for h in rank0_train if h not in RANK0_ONLY_TRAIN_HANDLERS]
    assert "ValidationHandler" in rank1_train  # every rank validates (collective forward of the DDP network)
    assert rank1_val is None
    assert not rank1_events  # no TensorBoard handler was even built on rank 1
    for rank in (0, 1):
        train, val, events = seen[rank, True]
        assert train == ["CheckpointLoader"] + seen[rank, False][0]
        assert (val, events) == seen[rank, False][1:]
