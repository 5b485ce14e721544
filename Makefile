# Quickstart: `make demo` and `make test`; both bootstrap .venv from the pinned requirements.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo

.PHONY: demo test verify data pairs train-rem evaluate-rem evaluate-refdrn clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

data: $(STAMP)
	$(PY) tools/fetch_sample_data.py

pairs: data
	$(PY) tools/make_brain_pairs.py

demo: data
	$(PY) -m monai.bundle run --config_file bundles/rem_sr/configs/inference.json \
		--bundle_root bundles/rem_sr --output_dir $(DEMO_OUT)/rem_sr
	$(PY) -m monai.bundle run --config_file bundles/rem_sr/configs/evaluate.json \
		--bundle_root bundles/rem_sr --output_dir $(DEMO_OUT)/rem_sr/evaluation
	@echo
	@echo "rem_sr demo outputs (LR input, SR output, HR reference):"
	@find $(DEMO_OUT)/rem_sr -name "*.nii.gz" | sort
	@echo "rem_sr figure: $(DEMO_OUT)/rem_sr/evaluation/sr_comparison.png"


test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

verify: $(STAMP)
	$(PY) tools/verify_bundles.py

train-rem: data
	$(PY) -m monai.bundle run --config_file bundles/rem_sr/configs/train.json --bundle_root bundles/rem_sr

evaluate-rem: data
	$(PY) -m monai.bundle run --config_file bundles/rem_sr/configs/evaluate.json --bundle_root bundles/rem_sr

evaluate-refdrn: pairs
	$(PY) -m monai.bundle run --config_file bundles/refdrn/configs/evaluate.json --bundle_root bundles/refdrn

clean:
	rm -rf $(DEMO_OUT) bundles/*/eval bundles/*/logs
