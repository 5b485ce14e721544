# Quickstart: `make demo` and `make test`; both bootstrap .venv from the pinned requirements.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
PACKAGE_OUT ?= outputs/packages
# the MONAI Deploy App SDK lives in its own venv (see requirements-deploy.txt for why)
DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
# the classical peers (elastix, ANTs, SimpleITK) live in their own venv: antspyx pins numpy below ours
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
# ECLARE, rem_sr's thick-slice SR peer, lives in its own venv: it pins scipy 1.11.4, below ours
ECLARE_VENV := .venv-eclare
ECLARE_STAMP := $(ECLARE_VENV)/.installed
# MONAI Label, for the app in apps/monailabel, lives in its own venv (see requirements-label.txt for why)
LABEL_VENV := .venv-label
LABEL_STAMP := $(LABEL_VENV)/.installed

.PHONY: demo test lint format verify export package deploy-venv test-deploy peers-venv eclare-venv label-venv label-atlases test-label label-server test-peers benchmark profile memory data pairs sr-data synth-pairs phantoms synth-phantoms train-rem evaluate-rem evaluate-refdrn evaluate-f3rnet generalisation clean

$(STAMP): requirements.txt requirements-dev.txt requirements-optional.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

data: $(STAMP)
	$(PY) tools/fetch_sample_data.py

pairs: data
	$(PY) tools/make_brain_pairs.py

phantoms: $(STAMP)
	$(PY) tools/make_abdomen_phantoms.py

# rem_sr's training mix: real label maps for the on-the-fly synthesis and synthetic validation volumes
sr-data: pairs
	$(PY) tools/make_sr_training_data.py

# SynthMorph-style registration data (issue: networks that generalise): brain pairs synthesised from the label maps
# (training family + a held-out family), and the abdominal phantom generator's random and held-out families
synth-pairs: sr-data
	$(PY) tools/make_synth_brain_pairs.py --family train
	$(PY) tools/make_synth_brain_pairs.py --family heldout

synth-phantoms: phantoms
	$(PY) tools/make_abdomen_phantoms.py --family random --n-subjects 36 --out data/abdomen_phantoms_random \
		--mix-with data/abdomen_phantoms
	$(PY) tools/make_abdomen_phantoms.py --family heldout --test-only --n-subjects 6 --out data/abdomen_phantoms_heldout

# the three bundles, each on one held-out case: a summary table and outputs/demo/overview.png (tools/demo.py);
# builds the sample data it needs first (a second run only re-checks it)
demo: pairs data/abdomen_phantoms/datalist_ct2mri.json
	$(PY) tools/demo.py --output_dir $(DEMO_OUT) --threads $(THREADS)

# the sample phantoms, made once (`make phantoms` remakes them)
data/abdomen_phantoms/datalist_ct2mri.json: | $(STAMP)
	$(PY) tools/make_abdomen_phantoms.py

test: $(STAMP)
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

# ruff lint + format check (pyproject.toml); `make format` applies both
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/sync_common.py --check

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

verify: $(STAMP)
	$(PY) tools/verify_bundles.py --require-weights

# models/model.ts (+ models/model.onnx) of every bundle that has weights, each checked against the eager network
export: $(STAMP)
	$(PY) tools/export_bundles.py

# one zip per bundle with weights + model_info.json in $(PACKAGE_OUT) (the zips `monai.bundle download` unpacks)
package: $(STAMP)
	$(PY) tools/package.py --output-dir $(PACKAGE_OUT)

$(DEPLOY_STAMP): requirements.txt requirements-deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $(DEPLOY_STAMP)

deploy-venv: $(DEPLOY_STAMP)

$(PEERS_STAMP): requirements-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-peers.txt
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

$(ECLARE_STAMP): requirements-eclare.txt
	$(PYTHON) -m venv $(ECLARE_VENV)
	$(ECLARE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-eclare.txt
	touch $(ECLARE_STAMP)

eclare-venv: $(ECLARE_STAMP)

# the tests that need the peers (ANTs reading the ITK-convention DDF, the peer methods of the benchmark)
test-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) -m pytest -q tests/test_itk_ddf.py

$(LABEL_STAMP): requirements.txt requirements-label.txt requirements-label-nodeps.txt
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-label.txt
	$(LABEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-label-nodeps.txt
	touch $(LABEL_STAMP)

label-venv: $(LABEL_STAMP)

# the MONAI Label app's atlases and sample studies (data/monailabel)
label-atlases: pairs phantoms
	$(PY) tools/make_label_atlases.py

# tests/test_monailabel_app.py with the server test enabled (the real MONAI Label server in $(LABEL_VENV))
test-label: $(STAMP) $(LABEL_STAMP) pairs phantoms
	$(PY) -m pytest -q -rs -s tests/test_monailabel_app.py

# serve the bundles to annotators: http://127.0.0.1:8000 (THREADS: torch threads per inference)
label-server: $(LABEL_STAMP) label-atlases
	PATH="$(CURDIR)/$(LABEL_VENV)/bin:$$PATH" monailabel start_server --app apps/monailabel \
		--studies data/monailabel/studies --host 127.0.0.1 --port 8000 $(if $(THREADS),--conf threads $(THREADS))

# tests/test_deploy.py with the SDK test enabled (it runs a MONAI Deploy application in $(DEPLOY_VENV))
test-deploy: $(STAMP) $(DEPLOY_STAMP)
	$(PY) -m pytest -q tests/test_deploy.py

train-rem: sr-data
	$(PY) -m monai.bundle run --config_file bundles/rem_sr/configs/train.json --bundle_root bundles/rem_sr

# every method of the model card's table (tools/compare_methods.py); CARD=1 also fills the card and eval_metrics
COMPARE = $(PY) tools/compare_methods.py $(if $(CARD),--card)

evaluate-rem: data
	$(COMPARE) rem_sr

evaluate-refdrn: pairs
	$(COMPARE) refdrn

evaluate-f3rnet: phantoms
	$(COMPARE) f3rnet_ct_mri

# each registration network alone on its real/sample test set, the training generator's test set and the held-out
# generator family (tools/generalisation.py); CARD=1 fills the cards
generalisation: synth-pairs phantoms synth-phantoms
	$(PY) tools/generalisation.py refdrn --threads $(THREADS) $(if $(CARD),--card)
	$(PY) tools/generalisation.py f3rnet_ct_mri --threads $(THREADS) $(if $(CARD),--card)
	$(PY) tools/generalisation.py f3rnet_ct_mri --set direction=mri2ct --output_dir outputs/generalisation/f3rnet_ct_mri_mri2ct --threads $(THREADS)

# the bundles against elastix and ANTs on the same pairs (tools/benchmark.py); the peers come from .venv-peers
# (`make peers-venv`; without it elastix runs in .venv and ANTs is skipped). THREADS: threads of every method.
# BASELINE (optional): a previous release (a git revision), run with its own code and weights for a before/after
# line, e.g. ce82f87 (before the CPU fast paths) or 37477f5 (before instance optimisation; the registration tables
# already hold the network-only rows, <bundle>:network). CARD=1 fills the cards.
THREADS ?= 2
BASELINE ?=
BENCH = $(PY) tools/benchmark.py --threads $(THREADS) $(if $(BASELINE),--baseline $(BASELINE)) $(if $(CARD),--card)
benchmark: pairs phantoms
	$(BENCH) rem_sr
	$(BENCH) rem_sr --scale 1x1x4
	$(BENCH) refdrn
	$(BENCH) f3rnet_ct_mri

# where each bundle's inference spends its time, stage by stage, on one test case (tools/profile_inference.py)
profile: pairs phantoms
	for b in rem_sr refdrn f3rnet_ct_mri; do $(PY) tools/profile_inference.py $$b --threads $(THREADS) $(if $(CARD),--card) || exit 1; done

# peak RSS of each bundle's inference at 128³, 192³ and 256³ (tools/peak_memory.py); CARD=1 fills the cards
memory: $(STAMP)
	for b in rem_sr refdrn f3rnet_ct_mri; do $(PY) tools/peak_memory.py $$b --threads $(THREADS) $(if $(CARD),--card) || exit 1; done

clean:
	rm -rf $(DEMO_OUT) $(PACKAGE_OUT) bundles/*/eval bundles/*/logs
