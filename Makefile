# hf-tumor: `make app` (set up, serve the bundled model), `make test` (set up, run the tests),
# `make train` (set up, train and evaluate the reference model), `make export`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/brain-tumor-mri
# The reference model is one 24-epoch cosine cycle on 95% of Training, keeping its last epoch
# (docs/experiments.md, run 24): 70-90 minutes on 2 cores with native bf16 (runs 24, 25), some 4 hours without.
OUT ?= runs/reference
# The torch build this project is tested with; override for another CUDA/CPU build.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test app export bench browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# An interrupted run resumes from its last complete checkpoint when run again.
train: setup
	$(BIN)/hf-tumor train configs/reference-24-val5.yaml --seed 7 --data_dir $(DATA) --output_dir $(OUT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

# The app serves HF_TUMOR_MODEL if set, else the bundled model if the repository has one, else the
# model `make train` writes.
BUNDLED := models/resnetv2_50-scratch-128
MODEL ?= $(or $(HF_TUMOR_MODEL),$(if $(wildcard $(BUNDLED)/config.json),$(BUNDLED),$(OUT)))

app: setup
	HF_TUMOR_MODEL=$(MODEL) GRADIO_ANALYTICS_ENABLED=False $(BIN)/python space/app.py

# ONNX fp32 + int8 files beside the weights, with their parity check on the whole Testing split.
export: setup
	$(BIN)/hf-tumor export --model $(MODEL) --quantize int8 --data_dir $(DATA)

# Every benchmark, on an idle machine; each writes its JSON under benchmarks/.
bench: setup
	$(BIN)/python scripts/bench_inference.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_train.py --data_dir $(DATA)
	$(BIN)/python scripts/bench_load.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_ood.py --model $(MODEL) --data_dir $(DATA)

# Debian's chromium for the browser test (Playwright drives it; it never downloads a browser of its own).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
