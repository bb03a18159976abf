# cifar-onnx: every target sets up .venv first, so a fresh clone needs nothing typed before.
FRAMEWORK ?= both
DATA ?= cifar10
EPOCHS ?=
OUT ?= artifacts
PYTHON ?= python3

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FRAMEWORKS := $(if $(filter both,$(FRAMEWORK)),torch keras,$(FRAMEWORK))
EPOCHS_OPTION := $(if $(EPOCHS),--epochs $(EPOCHS))
# verify and bench default to the data source that training recorded, unless DATA is given.
DATA_OPTION := $(if $(filter file,$(origin DATA)),,--data $(DATA))

.PHONY: help setup data train export verify classify bench test clean

help:  ## List targets and variables with their defaults.
	@echo "Targets:"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  \1\t/'
	@echo "Variables (current value):"
	@echo "  FRAMEWORK=$(FRAMEWORK)   torch, keras or both"
	@echo "  DATA=$(DATA)   cifar10 (download) or a folder / .tar / .tar.gz with train/<class>/ and test/<class>/"
	@echo "  EPOCHS=$(if $(EPOCHS),$(EPOCHS),<recipe default>)   training epochs"
	@echo "  OUT=$(OUT)   artifact folder"
	@echo "  IMAGES=$(IMAGES)   files or folders for make classify"

setup: $(STAMP)  ## Build .venv with every extra the pipeline needs (no-op when nothing changed).

# The gpu flavour of onnxruntime also runs on CPU; onnxruntime and onnxruntime-gpu
# must never share one environment, so only this one is installed here.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[torch,keras,gpu,dev]"
	touch $(STAMP)

data: setup  ## Build the cached dataset from DATA.
	$(BIN)/cifar-onnx data --data $(DATA) --out $(OUT)

train: setup  ## Train FRAMEWORK on DATA for EPOCHS.
	@set -e; for fw in $(FRAMEWORKS); do \
		$(BIN)/cifar-onnx train --framework $$fw --data $(DATA) --out $(OUT) $(EPOCHS_OPTION); \
	done

export: setup  ## Export the trained FRAMEWORK checkpoints to ONNX.
	@set -e; for fw in $(FRAMEWORKS); do \
		$(BIN)/cifar-onnx export --framework $$fw --out $(OUT); \
	done

verify: setup  ## Check every export against its framework and the frameworks against each other.
	$(BIN)/cifar-onnx verify --framework $(FRAMEWORK) $(DATA_OPTION) --out $(OUT)

classify: setup  ## Classify the images in IMAGES with the FRAMEWORK export (first one when both).
	$(BIN)/cifar-onnx classify $(IMAGES) --model $(OUT)/$(firstword $(FRAMEWORKS))/model.onnx

bench: setup  ## Measure throughput, cold start and footprint against the frameworks.
	$(BIN)/cifar-onnx bench $(DATA_OPTION) --out $(OUT)

test: setup  ## Run the whole test suite (CI runs exactly this).
	$(BIN)/python -m pytest

clean:  ## Remove artifacts (keeps .venv).
	rm -rf $(OUT)
