"""MONAI Deploy: the exported models/model.ts used the way a Deploy application uses it, checked against the
bundle's own `python -m monai.bundle run` inference to 1e-4.

- The contract (always runs, plain torch + MONAI): torch.jit.load the .ts with `_extra_files` to read the embedded
  metadata.json and inference.json, build preprocessing / inferer / postprocessing from the embedded config with
  MONAI's ConfigParser (LoadImage*/SaveImage* transforms removed, as MonaiBundleInferenceOperator does), run one
  volume. For rem_sr the SR output is compared; for refdrn (2-channel moving/fixed `image` input; randomly
  initialised backbone until it is trained) the displacement field.
- The SDK itself (rem_sr): a holoscan Application with MonaiBundleInferenceOperator runs in the separate
  .venv-deploy (`make deploy-venv`, requirements-deploy.txt; or $DEPLOY_PYTHON); skipped with the reason when that
  environment does not exist.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env, load_bundle_scripts, run_bundle, save_nifti, synthetic_brain
from tests.test_export_bundles import bundle_copies

EXPORT = REPO_ROOT / "tools" / "export_bundles.py"
DEPLOY_PYTHON = Path(os.environ.get("DEPLOY_PYTHON", REPO_ROOT / ".venv-deploy" / "bin" / "python"))
DISALLOWED = ("LoadImage", "SaveImage")  # what MonaiBundleInferenceOperator strips from the bundle's pipelines


def export(copies: Path, bundle: str) -> Path:
    result = subprocess.run(
        [sys.executable, str(EXPORT), bundle, "--bundles-dir", str(copies), "--no-onnx"],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0 and "model.ts    PASS" in result.stdout, result.stdout + result.stderr
    return copies / bundle / "models" / "model.ts"


def deploy_pipeline(ts_path: Path, bundle: str, inputs: dict) -> dict:
    """What a Deploy application does with model.ts and its embedded bundle configs. Only the bundle's `scripts`
    package (its custom transforms) comes from outside the .ts: an application ships it next to the model."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    extra = {"metadata.json": "", "inference.json": ""}
    network = torch.jit.load(str(ts_path), map_location="cpu", _extra_files=extra).eval()
    meta, config = json.loads(extra["metadata.json"]), json.loads(extra["inference.json"])
    load_bundle_scripts(bundle, "transforms")  # the bundle's `scripts` on sys.path, as the app ships them
    parser = ConfigParser()
    parser.read_meta(meta)
    parser.read_config(config)
    parser["precision"] = "fp32"  # TorchScript against eager in float32: bfloat16 rounding differs between them

    def stripped(name):
        compose = parser.get_parsed_content(name)
        return Compose([t for t in compose.transforms if not any(d in type(t).__name__ for d in DISALLOWED)])

    preprocessing, postprocessing = stripped("preprocessing"), stripped("postprocessing")
    inferer = parser.get_parsed_content("inferer")
    input_name = next(iter(meta["network_data_format"]["inputs"]))
    output_name = next(iter(meta["network_data_format"]["outputs"]))
    data = preprocessing(inputs)
    with torch.no_grad():
        pred = inferer(torch.as_tensor(data[input_name])[None].as_subclass(torch.Tensor), network)
    data[output_name] = pred[0]
    return {"data": data, "postprocessing": postprocessing, "meta": meta, "config": config, "pred": pred[0]}


def load_image(path: Path):
    from monai.transforms import LoadImage

    return LoadImage(image_only=True)(str(path))  # what the application's loader operator hands over


# ------------------------------------------------------------------------------------------------------ rem_sr
@pytest.fixture(scope="module")
def rem_case(tmp_path_factory):
    """rem_sr exported from a copy of the bundle, one LR volume (4 mm), and the bundle's own inference on it with
    the default inference.json (the config embedded in the .ts)."""
    tmp = tmp_path_factory.mktemp("deploy_rem")
    ts = export(bundle_copies(tmp / "bundles", ("rem_sr",)), "rem_sr")
    lr, _ = synthetic_brain((12, 14, 10), seed=7)
    save_nifti(lr * 3.0, tmp / "data" / "case_lr.nii.gz", spacing=4.0)  # not the network's [0, 1] units
    (tmp / "data" / "datalist.json").write_text(json.dumps({"test": [{"image": "case_lr.nii.gz"}]}))
    run_bundle(
        "rem_sr",
        ["inference.json"],
        {
            "datalist": str(tmp / "data" / "datalist.json"),
            "dataset_dir": str(tmp / "data"),
            "output_dir": str(tmp / "bundle_out"),
            "precision": "fp32",
        },
    )
    reference = np.asarray(nib.load(str(tmp / "bundle_out" / "case_lr" / "case_lr_sr.nii.gz")).dataobj, np.float32)
    return {"ts": ts, "input": tmp / "data" / "case_lr.nii.gz", "reference": reference, "tmp": tmp}


def test_rem_sr_ts_with_embedded_configs_matches_bundle_inference(rem_case):
    out = deploy_pipeline(rem_case["ts"], "rem_sr", {"image": load_image(rem_case["input"])})
    assert (
        out["meta"]["version"] == json.loads((BUNDLES / "rem_sr" / "configs" / "metadata.json").read_text())["version"]
    )
    result = out["postprocessing"](out["data"])  # RestoreIntensityd back to the input's units; SaveImaged stripped
    sr = torch.as_tensor(result["pred"]).as_subclass(torch.Tensor)[0].numpy()
    reference = rem_case["reference"]
    assert sr.shape == reference.shape == (48, 56, 40)
    assert np.abs(sr - reference).max() < 1e-4
    assert np.abs(reference).max() > 2  # in the input's units, not [0, 1]: the postprocessing really ran


# ------------------------------------------------------------------------------------------------------ refdrn
@pytest.fixture(scope="module")
def refdrn_case(tmp_path_factory):
    """refdrn (full cascade: frozen REM + backbone) exported from copies of rem_sr and refdrn, a 16^3 LR pair at
    4 mm (64^3 after the x4 upsampling: the trace shape, a multiple of 16), and the bundle's own inference with the
    same weights (--ckpt_path override while refdrn has no trained weights of its own)."""
    tmp = tmp_path_factory.mktemp("deploy_refdrn")
    copies = bundle_copies(tmp / "bundles")
    ts = export(copies, "refdrn")
    for name, seed in (("moving", 3), ("fixed", 4)):
        image, _ = synthetic_brain((16, 16, 16), seed=seed)
        save_nifti(image, tmp / "data" / f"{name}_lr.nii.gz", spacing=4.0)
    (tmp / "data" / "datalist.json").write_text(
        json.dumps({"test": [{"moving_image": "moving_lr.nii.gz", "fixed_image": "fixed_lr.nii.gz"}]})
    )
    run_bundle(
        "refdrn",
        ["inference.json"],
        {
            "datalist": str(tmp / "data" / "datalist.json"),
            "dataset_dir": str(tmp / "data"),
            "output_dir": str(tmp / "bundle_out"),
            "ckpt_path": str(copies / "refdrn" / "models" / "model.pt"),
            "precision": "fp32",
            # the exported graph is the network alone; instance optimisation runs only in the bundle
            "io_iterations": 0,
        },
    )
    ddf = np.asarray(nib.load(str(tmp / "bundle_out" / "moving_lr" / "moving_lr_ddf.nii.gz")).dataobj, np.float32)
    return {"ts": ts, "data": tmp / "data", "reference": np.moveaxis(ddf.reshape(ddf.shape[:3] + (-1,)), -1, 0)}


def test_refdrn_ts_with_embedded_configs_matches_bundle_inference(refdrn_case):
    data = refdrn_case["data"]
    inputs = {
        "moving_image": load_image(data / "moving_lr.nii.gz"),
        "fixed_image": load_image(data / "fixed_lr.nii.gz"),
    }
    out = deploy_pipeline(refdrn_case["ts"], "refdrn", inputs)
    assert out["meta"]["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert tuple(out["data"]["image"].shape) == (2, 64, 64, 64)  # moving, fixed stacked by the embedded ConcatItemsd
    ddf = out["pred"].numpy()
    reference = refdrn_case["reference"]
    assert ddf.shape == reference.shape == (3, 64, 64, 64)
    assert np.abs(reference).max() > 1e-2  # a real field, not the ~0 of an untrained flow head
    assert np.abs(ddf - reference).max() < 1e-4
    # the bundle's postprocessing warps REM's SR moving image, which the exported network does not return:
    # a Deploy application gets the DDF only (documented in README.md, "MONAI Deploy")
    needed = {t.image_key for t in out["postprocessing"].transforms if hasattr(t, "image_key")}
    assert needed == {"sr_moving"} and "sr_moving" not in out["data"]


# ------------------------------------------------------------------------------------------- the SDK itself
SDK_APP = textwrap.dedent('''
    """A minimal MONAI Deploy application: NIfTI -> MonaiBundleInferenceOperator(model.ts) -> .npy."""
    import sys
    from pathlib import Path

    import nibabel as nib
    import numpy as np
    from holoscan.conditions import CountCondition
    from monai.deploy.core import AppContext, Application, Image, IOType, Operator
    from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator

    TS, SCRIPTS_ROOT, NIFTI, OUT = sys.argv[1:5]
    sys.path.insert(0, SCRIPTS_ROOT)  # the bundle's `scripts` (custom transforms) ship with the application


    class NiftiSource(Operator):
        def setup(self, spec):
            spec.output("image")

        def compute(self, op_input, op_output, context):
            img = nib.load(NIFTI)
            meta = {
                "affine": img.affine,
                "original_affine": img.affine,
                "spacing": np.asarray(img.header.get_zooms()[:3]),
                "original_channel_dim": "no_channel",
                "filename_or_obj": NIFTI,
            }
            op_output.emit(Image(np.asarray(img.dataobj, np.float32), metadata=meta), "image")


    class FloatImageBundleOperator(MonaiBundleInferenceOperator):
        """Two overrides the SDK 4.0.0 operator needs for a super-resolution bundle:
        - predict: the operator passes every other tensor of the preprocessed dict to the network as a keyword
          argument; rem_sr's preprocessing keeps the LR input (`lr_input`, for saving), which the network rejects;
        - _send_output: for an `image` output the operator casts to uint8 (segmentation masks), which would destroy
          an SR volume; emit the float array instead."""

        def predict(self, data, *args, **kwargs):
            return self._inferer(inputs=data, network=self._model_network)

        def _send_output(self, value, name, metadata, op_output, context):
            op_output.emit(np.asarray(value.detach().cpu(), np.float32), name)


    class NpySink(Operator):
        def setup(self, spec):
            spec.input("pred")

        def compute(self, op_input, op_output, context):
            np.save(OUT, op_input.receive("pred"))


    class SRApp(Application):
        def compose(self):
            context = AppContext({"model": TS})
            source = NiftiSource(self, CountCondition(self, 1), name="nifti_source")
            infer = FloatImageBundleOperator(self, app_context=context, bundle_path=TS, name="bundle_inference",
                                             input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                                             output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)])
            self.add_flow(source, infer, {("image", "image")})
            self.add_flow(infer, NpySink(self, name="npy_sink"), {("pred", "pred")})


    SRApp().run()
    print("deploy app finished", Path(OUT).is_file())
''')


@pytest.mark.skipif(
    not DEPLOY_PYTHON.is_file(),
    reason=f"MONAI Deploy App SDK not installed: `make deploy-venv` builds {DEPLOY_PYTHON.parent.parent} "
    "from requirements-deploy.txt (its own venv: the SDK would make every `import monai` load "
    "holoscan); or set DEPLOY_PYTHON",
)
def test_rem_sr_through_monai_deploy_sdk_matches_bundle_inference(rem_case):
    tmp = rem_case["tmp"]
    (tmp / "sdk_app.py").write_text(SDK_APP)
    out = tmp / "sdk_pred.npy"
    env = dict(bundle_env(), HOLOSCAN_LOG_LEVEL="WARN")
    result = subprocess.run(
        [
            str(DEPLOY_PYTHON),
            str(tmp / "sdk_app.py"),
            str(rem_case["ts"]),
            str(BUNDLES / "rem_sr"),
            str(rem_case["input"]),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )
    assert result.returncode == 0 and out.is_file(), (result.stdout + result.stderr)[-6000:]
    sr = np.load(out)[0]
    reference = rem_case["reference"]
    assert sr.shape == reference.shape
    assert np.abs(sr - reference).max() < 1e-4
