"""MONAI Label app (apps/monailabel): the bundle-runner helper in the main environment, and the real server.

- ``lib/bundle_run.py`` (no MONAI Label import) runs here always: the command line, the bundle's error line as the
  task's error, the output lookup.
- The server test starts ``monailabel start_server`` on 127.0.0.1 with the app, in .venv-label (``make
  label-venv``; or $LABEL_VENV), on a studies folder of sample volumes (``tools/make_label_atlases.py``), and goes
  through the REST API as a client would. Skipped, with the reason, when .venv-label or the sample data is missing
  (``make test-label`` makes both); CI does not run it.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env, save_nifti

APP = REPO_ROOT / "apps" / "monailabel"
LABEL_VENV = Path(os.environ.get("LABEL_VENV", REPO_ROOT / ".venv-label"))
THREADS = 2
SERVED: dict[str, Path] = {}  # each task's result, kept for the figure (tools/monailabel_figure.py)
FIGURE = REPO_ROOT / "outputs" / "monailabel" / "results.png"


def load_bundle_run():
    spec = importlib.util.spec_from_file_location("monailabel_app_bundle_run", APP / "lib" / "bundle_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bundle_run = load_bundle_run()


def test_bundle_command_passes_overrides_to_the_runner():
    command = bundle_run.bundle_command(BUNDLES / "refdrn", {"fixed_image": "/a b.nii.gz", "io_iterations": 0})
    assert command[:4] == [sys.executable, "-m", "monai.bundle", "run"]
    assert command[command.index("--config_file") + 1] == str(BUNDLES / "refdrn" / "configs" / "inference.json")
    assert command[command.index("--fixed_image") + 1] == "/a b.nii.gz"  # one argument, not split or quoted
    assert command[command.index("--io_iterations") + 1] == "0"


def test_error_line_is_the_bundles_own_error():
    log = "parsing config_file ...\nTraceback (most recent call last):\n  ...\nerror: /x.nii.gz: file not found\n\n"
    assert bundle_run.error_line(log) == "/x.nii.gz: file not found"
    assert bundle_run.error_line("a\nKilled\n") == "Killed"
    assert bundle_run.error_line("") == "no output"


def test_find_output_wants_exactly_one(tmp_path):
    with pytest.raises(bundle_run.BundleRunError, match="found 0"):
        bundle_run.find_output(tmp_path, "sr")
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "case_sr.nii.gz").write_bytes(b"")
    (tmp_path / "case" / "case_lr.nii.gz").write_bytes(b"")
    assert bundle_run.find_output(tmp_path, "sr") == tmp_path / "case" / "case_sr.nii.gz"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "other_sr.nii.gz").write_bytes(b"")
    with pytest.raises(bundle_run.BundleRunError, match="found 2"):
        bundle_run.find_output(tmp_path, "sr")


def test_run_bundle_raises_the_bundles_error_for_a_bad_input(tmp_path):
    """A 2D file given to rem_sr: the task's error is rem_sr's one line naming the file, not a traceback."""
    bad = save_nifti(np.zeros((32, 32), np.float32), tmp_path / "flat.nii.gz")
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(bundle_run.BundleRunError) as info:
        bundle_run.run_bundle(BUNDLES / "rem_sr", {"image": str(bad), "output_dir": str(tmp_path / "out")}, workdir, 1)
    message = str(info.value)
    assert "flat.nii.gz" in message and "Traceback" not in message and "\n" not in message
    assert (workdir / "bundle.log").is_file()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


# --------------------------------------------------------------------------------------------------------------
# the real server, in .venv-label


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str = "GET", timeout: float = 1800, form: dict | None = None) -> tuple[int, bytes]:
    data = urllib.parse.urlencode(form).encode() if form else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def dice(a: np.ndarray, b: np.ndarray, ids) -> float:
    scores = [2 * np.sum((a == i) & (b == i)) / max(np.sum(a == i) + np.sum(b == i), 1) for i in ids]
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    pairs, phantom_dir = REPO_ROOT / "data" / "brain_pairs", REPO_ROOT / "data" / "abdomen_phantoms"
    if not (LABEL_VENV / "bin" / "monailabel").is_file():
        pytest.skip(f"no MONAI Label environment at {LABEL_VENV}: `make label-venv` (or set LABEL_VENV)")
    if not (pairs / "datalist.json").is_file() or not (phantom_dir / "datalist_ct2mri.json").is_file():
        pytest.skip("sample data missing: `make pairs phantoms` (or `make test-label`)")
    sys.path.insert(0, str(REPO_ROOT))
    from tools import make_label_atlases

    out = tmp_path_factory.mktemp("monailabel")
    make_label_atlases.build(out, pairs, phantom_dir, REPO_ROOT / "data" / ".cache" / "wheels")
    return out


@pytest.fixture(scope="module")
def server(sample):
    port = free_port()
    env = bundle_env()
    env["PATH"] = f"{LABEL_VENV / 'bin'}{os.pathsep}{env['PATH']}"  # as with the venv activated
    env.pop("PYTHONPATH", None)
    log = open(sample / "server.log", "w")
    command = [
        "monailabel",
        "start_server",
        "--app",
        str(APP),
        "--studies",
        str(sample / "studies"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "atlases",
        str(sample / "atlases"),
        "--conf",
        "threads",
        str(THREADS),
    ]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{(sample / 'server.log').read_text()[-3000:]}")
            try:
                if request(f"{url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"server did not answer:\n{(sample / 'server.log').read_text()[-3000:]}")
        yield url, sample
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def bundle_output(bundle: str, overrides: dict, tmp: Path, postfix: str) -> Path:
    """The bundle's own output for the same inputs, through its runner (the same threads as the server's)."""
    tmp.mkdir(parents=True, exist_ok=True)
    bundle_run.run_bundle(BUNDLES / bundle, {**overrides, "output_dir": str(tmp / "out")}, tmp, THREADS)
    return bundle_run.find_output(tmp / "out", postfix)


def server_dir(sample: Path, task: str) -> Path:
    (sample / "served").mkdir(exist_ok=True)
    return sample / "served" / f"{task}.nii.gz"


def post_infer(url: str, task: str, image: str, out: Path, params: dict | None = None) -> Path:
    start = time.monotonic()
    form = {"params": json.dumps(params)} if params else None
    status, body = request(f"{url}/infer/{task}?image={image}&output=image", method="POST", form=form)
    assert status == 200, body[:2000]
    print(f"{task}: POST /infer answered in {time.monotonic() - start:.1f} s")
    out.write_bytes(body)
    return out


def test_server_lists_the_tasks(server):
    url, _ = server
    status, body = request(f"{url}/info/")
    assert status == 200
    models = json.loads(body)["models"]
    assert set(models) == {"rem_sr", "brain_atlas", "abdomen_atlas"}
    assert models["rem_sr"]["type"] == "others"
    assert models["brain_atlas"]["type"] == models["abdomen_atlas"]["type"] == "segmentation"
    assert models["abdomen_atlas"]["labels"] == {"liver": 1, "spleen": 2, "right kidney": 3, "left kidney": 4}
    assert len(models["brain_atlas"]["labels"]) == 82 and models["brain_atlas"]["labels"]["left bankssts"] == 1
    assert models["rem_sr"]["version"] == json.loads((BUNDLES / "rem_sr/configs/metadata.json").read_text())["version"]


def test_super_resolution_matches_the_bundle(server, tmp_path):
    url, sample = server
    image = sample / "studies" / "brain_donor15496_lr4.nii.gz"
    path = post_infer(url, "rem_sr", image.name.removesuffix(".nii.gz"), server_dir(sample, "rem_sr"))
    served = nib.load(str(path))
    own = nib.load(str(bundle_output("rem_sr", {"image": str(image)}, tmp_path / "own", "sr")))
    lr = nib.load(str(image))
    assert served.shape == own.shape == tuple(4 * s for s in lr.shape)  # the HR grid, not restored to the LR one
    np.testing.assert_allclose(served.affine, own.affine, atol=1e-4)
    np.testing.assert_allclose(served.header.get_zooms()[:3], (1.0, 1.0, 1.0), atol=1e-4)
    np.testing.assert_allclose(np.asarray(served.dataobj), np.asarray(own.dataobj), atol=1e-4)
    SERVED["rem_sr"] = path


@pytest.mark.parametrize(
    "task, bundle, study, extra",
    [
        ("abdomen_atlas", "f3rnet_ct_mri", "abdomen_case011_mr", {"direction": "ct2mri"}),
        ("brain_atlas", "refdrn", "brain_donor15496_lr4", {}),
    ],
)
def test_atlas_segmentation_matches_the_bundle_and_beats_identity(server, tmp_path, task, bundle, study, extra):
    url, sample = server
    atlas = sample / "atlases" / task.removesuffix("_atlas")
    image = sample / "studies" / f"{study}.nii.gz"
    path = post_infer(url, task, study, server_dir(sample, task))
    served = nib.load(str(path))
    overrides = {
        **extra,
        "fixed_image": str(image),
        "moving_image": str(atlas / "image.nii.gz"),
        "moving_label": str(atlas / "label.nii.gz"),
    }
    own = nib.load(str(bundle_output(bundle, overrides, tmp_path / "own", "warped_label")))
    served_labels, own_labels = np.asarray(served.dataobj), np.asarray(own.dataobj)
    assert served.shape == own.shape
    np.testing.assert_allclose(served.affine, own.affine, atol=1e-4)
    np.testing.assert_array_equal(served_labels, own_labels)  # the bundle's own warped label, exactly

    reference = nib.load(str(sample / "reference" / f"{study}_label.nii.gz"))
    atlas_label = nib.load(str(atlas / "label.nii.gz"))
    assert reference.shape == served.shape == atlas_label.shape  # all on the fixed image's label grid
    np.testing.assert_allclose(reference.affine, served.affine, atol=1e-4)
    truth = np.asarray(reference.dataobj)
    ids = [int(i) for i in json.loads((atlas / "atlas.json").read_text())["labels"].values()]
    propagated, identity = dice(served_labels, truth, ids), dice(np.asarray(atlas_label.dataobj), truth, ids)
    print(f"{task}: Dice of the propagated labels {propagated:.4f}, identity {identity:.4f}")
    assert propagated > identity
    SERVED[task] = path


def test_atlas_segmentation_without_instance_optimisation(server, tmp_path):
    """A request's {"instance_optimisation": false}: the network's DDF alone, the bundle's --io_iterations 0."""
    url, sample = server
    atlas, image = sample / "atlases" / "abdomen", sample / "studies" / "abdomen_case011_mr.nii.gz"
    path = post_infer(
        url, "abdomen_atlas", "abdomen_case011_mr", tmp_path / "served.nii.gz", {"instance_optimisation": False}
    )
    overrides = {
        "direction": "ct2mri",
        "fixed_image": str(image),
        "moving_image": str(atlas / "image.nii.gz"),
        "moving_label": str(atlas / "label.nii.gz"),
        "io_iterations": 0,
    }
    own = bundle_output("f3rnet_ct_mri", overrides, tmp_path / "own", "warped_label")
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(own)).dataobj))
    if "abdomen_atlas" in SERVED:  # instance optimisation changes the result
        with_io = np.asarray(nib.load(str(SERVED["abdomen_atlas"])).dataobj)
        assert not np.array_equal(with_io, np.asarray(nib.load(str(path)).dataobj))


def test_bad_input_gets_one_clear_error(server, tmp_path):
    """An image the bundle refuses: HTTP 422 with the bundle's one line naming the file, not a 500 traceback."""
    url, _ = server
    bad = save_nifti(np.zeros((32, 32), np.float32), tmp_path / "flat2d.nii.gz")
    # MONAI Label takes an existing path as the image, as well as a datastore id
    status, body = request(f"{url}/infer/rem_sr?image={urllib.parse.quote(str(bad))}&output=image", method="POST")
    assert status == 422, body[:2000]
    detail = json.loads(body)["detail"]
    assert "flat2d.nii.gz" in detail and "Traceback" not in detail, detail


def test_figure_of_the_results(server):
    """The README's figure of the returned results (outputs/monailabel/results.png)."""
    _, sample = server
    if set(SERVED) != {"rem_sr", "brain_atlas", "abdomen_atlas"}:
        pytest.skip(f"a task's test failed or was deselected (have {sorted(SERVED)})")
    sys.path.insert(0, str(REPO_ROOT))
    from tools import monailabel_figure

    atlases, reference = sample / "atlases", sample / "reference"
    brain_ids = list(json.loads((atlases / "brain" / "atlas.json").read_text())["labels"].values())
    FIGURE.unlink(missing_ok=True)
    monailabel_figure.render(
        FIGURE,
        sample / "studies" / "brain_donor15496_lr4.nii.gz",
        SERVED["rem_sr"],
        SERVED["brain_atlas"],
        reference / "brain_donor15496_lr4_label.nii.gz",
        atlases / "brain" / "label.nii.gz",
        brain_ids,
        atlases / "abdomen" / "image.nii.gz",
        atlases / "abdomen" / "label.nii.gz",
        sample / "studies" / "abdomen_case011_mr.nii.gz",
        SERVED["abdomen_atlas"],
        reference / "abdomen_case011_mr_label.nii.gz",
    )
    assert FIGURE.stat().st_size > 50_000
    print(f"figure: {FIGURE}")
