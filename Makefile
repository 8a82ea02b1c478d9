# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install requirements.txt.
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_DATA ?= $(DEMO_DIR)/data
DEMO_WEIGHTS ?= assets/yolov6n_synthetic.pt
DEMO_IMG_SIZE ?= 320
DEMO_VAL ?= 200
DEMO_SEED ?= 0
PYTEST_ARGS ?=

.PHONY: venv demo test train-demo clean-demo help peers

help:
	@echo "make demo   - create $(VENV), install, run the partial-quantization pipeline on the bundled model (writes $(DEMO_DIR)/)"
	@echo "make test   - create $(VENV), install, run the test suite"
	@echo "make train-demo - retrain the bundled demo detector (~40 min on 2 CPU cores)"
	@echo "make peers  - also install NNCF and ModelOpt into $(VENV) (optional, for benchmarks/peers.py)"

$(VENV)/.installed: requirements.txt
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Optional peers (benchmarks/peers.py); requirements.txt again keeps the pinned CPU torch and onnx in place.
peers: venv
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-peers.txt

DEMO_CALIB ?= 64
DEMO_TARGET_DROP ?= 0.001

# The whole pipeline on the bundled model (~5-8 min on 2 cores): data -> calibrate + sensitivity (sqnr proxy) ->
# partial quantization (--target-drop) -> verified Q/DQ ONNX -> ONNX Runtime mAP -> $(DEMO_DIR)/summary.json.
demo: venv
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/.started
	$(PY) tools/make_synthetic_coco.py --out $(DEMO_DATA) --train $(DEMO_CALIB) --val $(DEMO_VAL) \
		--img-size $(DEMO_IMG_SIZE) --seed $(DEMO_SEED)
	$(PY) sensitivity_analyse.py --weights $(DEMO_WEIGHTS) --method sqnr --data-root $(DEMO_DATA)/images/train \
		--batch-size 16 --batch-number 4 --img-size $(DEMO_IMG_SIZE) --output $(DEMO_DIR)/sensitivity --overwrite \
		--seed $(DEMO_SEED)
	$(PY) partial_quant.py --weights $(DEMO_WEIGHTS) --calib-weights $(DEMO_DIR)/sensitivity/calibrated.pt \
		--sensitivity-file $(DEMO_DIR)/sensitivity/sensitivity_sqnr.json --target-drop $(DEMO_TARGET_DROP) \
		--data $(DEMO_DATA)/annotations/instances_val.json --images $(DEMO_DATA)/images/val \
		--img-size $(DEMO_IMG_SIZE) --batch-size 16 --eval-onnx --output-dir $(DEMO_DIR) --overwrite
	$(PY) tools/demo_summary.py --partial-report $(DEMO_DIR)/partial_quant.json \
		--started-at $$(cat $(DEMO_DIR)/.started) --output $(DEMO_DIR)/summary.json
	@rm -f $(DEMO_DIR)/.started

clean-demo:
	rm -rf $(DEMO_DIR)

# Reproduces the bundled demo detector (about 40 minutes on 2 CPU cores; README gives the numbers).
TRAIN_DIR ?= runs/demo_train
train-demo: venv
	$(PY) tools/make_synthetic_coco.py --out runs/synthetic --train 1200 --val 200 --img-size 320 --seed 0
	$(PY) train.py --config yolov6n --data runs/synthetic/annotations/instances_train.json \
		--images runs/synthetic/images/train --val-data runs/synthetic/annotations/instances_val.json \
		--val-images runs/synthetic/images/val --img-size 320 --epochs 24 --batch-size 16 --nominal-batch 32 \
		--eval-interval 4 --no-mosaic-last 10 --workers 1 --seed 0 --output-dir $(TRAIN_DIR)
	$(PY) tools/package_model.py --weights $(TRAIN_DIR)/best.pt --out $(TRAIN_DIR)/yolov6n_synthetic.pt
