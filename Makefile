# hf-tumor: `make app` (set up, serve the bundled model), `make test` (set up, run the tests),
# `make train` (set up, train and evaluate the reference model), `make export`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/brain-tumor-mri
# The reference model trains in three stages of 15 epochs (docs/experiments.md, run 5): one stage is
# what fits a 2-hour session on 2 AVX2 cores (35 minutes with native bf16); each restarts from the
# previous stage's last checkpoint.
STAGE1 := runs/reference
STAGE2 := runs/reference-stage2
OUT ?= runs/reference-stage3b
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

# A stage that was interrupted resumes from its last complete checkpoint when run again.
train: setup
	$(BIN)/hf-tumor train configs/reference.yaml --data_dir $(DATA) --output_dir $(STAGE1)
	$(BIN)/hf-tumor train configs/reference-stage2.yaml --data_dir $(DATA) --output_dir $(STAGE2)
	$(BIN)/hf-tumor train configs/reference-stage3b.yaml --data_dir $(DATA) --output_dir $(OUT)

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
