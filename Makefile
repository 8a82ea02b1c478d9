# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install requirements.txt.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_DATA ?= $(DEMO_DIR)/data
DEMO_CONFIG ?= yolov6n
DEMO_IMG_SIZE ?= 320
DEMO_SEED ?= 0
PYTEST_ARGS ?=

.PHONY: venv demo test clean-demo help

help:
	@echo "make demo   - create $(VENV), install, run the pipeline on synthetic demo data (writes $(DEMO_DIR)/)"
	@echo "make test   - create $(VENV), install, run the test suite"

$(VENV)/.installed: requirements.txt
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) tools/make_synthetic_coco.py --out $(DEMO_DATA) --train 0 --val 100 --img-size $(DEMO_IMG_SIZE) --seed $(DEMO_SEED)
	$(PY) tools/init_checkpoint.py --config $(DEMO_CONFIG) --data $(DEMO_DATA)/annotations/instances_val.json \
		--seed $(DEMO_SEED) --out $(DEMO_DIR)/$(DEMO_CONFIG)_untrained.pt
	$(PY) eval_coco.py --weights $(DEMO_DIR)/$(DEMO_CONFIG)_untrained.pt --data $(DEMO_DATA)/annotations/instances_val.json \
		--images $(DEMO_DATA)/images/val --img-size $(DEMO_IMG_SIZE) --results $(DEMO_DIR)/eval_pt.json
	$(PY) export_onnx.py --weights $(DEMO_DIR)/$(DEMO_CONFIG)_untrained.pt --output $(DEMO_DIR)/$(DEMO_CONFIG)_untrained.onnx \
		--img-size $(DEMO_IMG_SIZE) --dynamic-batch --verify-images $(DEMO_DATA)/images/val --overwrite
	$(PY) eval_coco.py --weights $(DEMO_DIR)/$(DEMO_CONFIG)_untrained.onnx --data $(DEMO_DATA)/annotations/instances_val.json \
		--images $(DEMO_DATA)/images/val --img-size $(DEMO_IMG_SIZE) --results $(DEMO_DIR)/eval_onnx.json
	@echo "demo done: results in $(DEMO_DIR)/ (eval_pt.json, eval_onnx.json)"

clean-demo:
	rm -rf $(DEMO_DIR)
