# hf-tumor: `make app` (set up, serve the bundled model), `make test` (set up, install the system packages
# the tests use, run every test), `make test-fast` (the tests that train nothing, skipping what lacks its
# system package), `make train` (train and evaluate the recipe),
# `make export`, `make external`, `make web` (the model in the browser), `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/brain-tumor-mri
OUT ?= runs/reference
# The torch build this project is tested with; override for another CUDA/CPU build.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test test-fast app export external web web-serve bench system-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The recipe is the code's defaults (docs/experiments.md, candidate 3: seed 7), which need PyPI packages
# only: its healthy slices come from nilearn's MNI152 template. The bundled model's run also cut slices of
# the ITK head: its exact command is this one with `--healthy_sources mni152 itk_t1` (after
# `make system-deps`, which installs Debian's insighttoolkit5-examples). About 90 minutes on 2 CPU cores
# with native bf16, about 4 hours without. An interrupted run resumes from its last complete checkpoint.
train: setup
	$(BIN)/hf-tumor train --init scratch --seed 7 --data_dir $(DATA) --output_dir $(OUT)

# Every test, none skipped: system-deps first (it installs or names what is missing), then pytest with
# HF_TUMOR_REQUIRE_ALL=1, under which a test that would skip for want of a program or package fails and
# names it. Registries, the first time only: the Debian archive (chromium, npm, the ITK data) and the npm
# registry (the browser page's ONNX Runtime Web, `npm ci` of web/package-lock.json into web/node_modules);
# the tests themselves run offline.
test: setup system-deps
	HF_HUB_OFFLINE=1 HF_TUMOR_REQUIRE_ALL=1 $(BIN)/python -m pytest -q

# No training and no system packages needed: a test whose program or package is missing here (chromium,
# npm, the ITK data) is skipped, and pytest's summary lists each skip with what it needs. Where npm is
# installed, the browser-page tests still fetch ONNX Runtime Web from the npm registry the first time.
test-fast: setup
	@echo "make test-fast: the tests that train nothing; tests needing chromium, npm or the ITK data skip where those are missing (make test runs them all)"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

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

# The external check: healthy MRI volumes shipped in packages, slice by slice.
external: setup
	$(BIN)/hf-tumor external --model $(MODEL)

# The in-browser page in web/dist: the page, ONNX Runtime Web from the npm registry (web/package-lock.json)
# and the model's int8 file; web-serve also serves it, cross-origin isolated, at http://127.0.0.1:8000.
web: setup
	$(BIN)/python scripts/build_web.py --model $(MODEL) --out web/dist

web-serve: setup
	$(BIN)/python scripts/build_web.py --model $(MODEL) --out web/dist --serve 8000

# Every benchmark, on an idle machine; each writes benchmarks/{measure}_{detail}_{machine kind}.json.
bench: setup
	$(BIN)/python scripts/bench_inference.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_train.py --data_dir $(DATA)
	$(BIN)/python scripts/bench_app_start.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_load.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_ood.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_scan.py --model $(MODEL)
	$(BIN)/python scripts/bench_predict_start.py --model $(MODEL) --data_dir $(DATA)
	$(BIN)/python scripts/bench_web.py --model $(MODEL) --data_dir $(DATA)

# Debian packages the tests use: chromium for the browser tests (Playwright drives /usr/bin/chromium; it
# never downloads a browser of its own), the ITK example data (a head MR volume for the external check
# and the bundled run's healthy slices) and npm (the in-browser page's runtime comes from the npm
# registry). Whatever is missing is installed with apt-get when this runs as root on Debian/Ubuntu;
# otherwise it prints the command to run and fails.
system-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	[ -d /usr/share/doc/insighttoolkit5-examples/examples/Data ] || missing="$$missing insighttoolkit5-examples"; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "error: the tests need these Debian packages, missing here:$$missing" >&2; \
	  echo "  install them (Debian/Ubuntu: sudo apt-get install$$missing), then run this again;" >&2; \
	  echo "  make test-fast runs without them (skipping the tests that need them)" >&2; \
	  exit 1; \
	fi; \
	echo "installing$$missing (apt-get)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing || \
	  { echo "error: apt-get could not install$$missing (is the Debian archive reachable?)" >&2; exit 1; }
