"""MONAI Label app serving this package's bundles to annotators.

Infer tasks (``GET /info/`` lists them; ``POST /infer/<task>?image=<id>`` runs one):

- ``rem_sr``: super-resolution of a low-resolution brain MR; returns the SR volume on the high-resolution grid.
- ``brain_atlas``: atlas-based segmentation of a brain MR (4 mm voxels, refdrn's x4 input) by refdrn: a labelled
  brain atlas (Desikan-Killiany, 82 structures) registered onto it; returns the warped atlas labels.
- ``abdomen_atlas``: atlas-based segmentation of an abdominal MR by f3rnet_ct_mri (CT->MRI): a labelled CT atlas
  (liver, spleen, kidneys) registered onto it; returns the warped atlas labels.

Start (in .venv-label, ``make label-venv``; atlases and sample studies from ``make label-atlases``)::

    monailabel start_server --app apps/monailabel --studies data/monailabel/studies

Options (``--conf <name> <value>``):

- ``bundles``: the folder holding the bundles (default: this repository's ``bundles/``);
- ``atlases``: the folder holding ``brain/`` and ``abdomen/`` (default: ``data/monailabel/atlases``);
- ``threads``: torch threads per inference (default: the server's environment);
- ``infer_timeout_s``: wall-clock limit of one inference in seconds (default 1800).

A task whose bundle or atlas is missing is left out, with one logged error naming the file and the command that
makes it. An inference that fails answers HTTP 422 with the bundle's own one-line error (the file and the problem),
not a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib.infers import AtlasSegmentationTask, SuperResolutionTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class RegistrationZooApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundles = Path(conf.get("bundles", REPO_ROOT / "bundles"))
        self.atlases = Path(conf.get("atlases", REPO_ROOT / "data" / "monailabel" / "atlases"))
        threads = conf.get("threads")
        self.threads = int(threads) if threads else None
        self.timeout_s = float(conf.get("infer_timeout_s", 1800))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Resolution-enhanced and multimodal registration (MONAI bundles)",
            description="Super-resolution (rem_sr) and atlas-based segmentation by deformable registration "
            "(refdrn, f3rnet_ct_mri)",
            version="1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        run = {"threads": self.threads, "timeout_s": self.timeout_s}
        candidates: dict[str, InferTask] = {
            "rem_sr": SuperResolutionTask(self.bundles / "rem_sr", **run),
            "brain_atlas": AtlasSegmentationTask(
                self.bundles / "refdrn",
                self.atlases / "brain",
                "Brain atlas segmentation by registration (refdrn: REM x4 super-resolution + FDRN, instance "
                "optimisation): Desikan-Killiany labels of an atlas warped onto a 4 mm brain MR, on the 1 mm grid",
                **run,
            ),
            "abdomen_atlas": AtlasSegmentationTask(
                self.bundles / "f3rnet_ct_mri",
                self.atlases / "abdomen",
                "Abdominal organ segmentation by CT->MR registration (F3RNet, MIND-SSC instance optimisation): "
                "liver, spleen and kidney labels of a CT atlas warped onto an abdominal MR",
                extra={"direction": "ct2mri"},
                **run,
            ),
        }
        infers: dict[str, InferTask] = {}
        for name, task in candidates.items():
            why = task.missing()
            if why:
                logger.error(f"infer task {name} left out: {why}")
                continue
            infers[name] = task
        return infers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            # one clear line for the client and the log, instead of an HTTP 500 with a traceback
            logger.error(f"infer {request.get('model')}: {e.msg}")
            raise HTTPException(status_code=422, detail=e.msg) from None


def main() -> None:
    """Run one task without a server: ``python apps/monailabel/main.py <task> <image>`` (in .venv-label)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("task", choices=["rem_sr", "brain_atlas", "abdomen_atlas"])
    parser.add_argument("image", help="a NIfTI file")
    parser.add_argument("--studies", default=str(REPO_ROOT / "data" / "monailabel" / "studies"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    app = RegistrationZooApp(os.path.dirname(os.path.abspath(__file__)), args.studies, {})
    try:
        result = app.infer({"model": args.task, "image": os.path.abspath(args.image)})
    except HTTPException as e:  # the task's one-line error, as the server answers it
        raise SystemExit(f"error: {e.detail}") from None
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
