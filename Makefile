# ppipe-trt — everything runs from a local virtual environment (.venv).
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
PROFILES  ?= ../shared/ppipe-profiles
# The CPU build of torch (a local wheel on our machines).  Elsewhere add e.g.
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
GPU_CLASS ?=
# MODEL: a built-in name or an .onnx path; unset: the models of MODEL_REPOSITORY
MODEL     ?=
# A Triton-layout model repository (<dir>/<name>/config.pbtxt, <dir>/<name>/1/model.onnx);
# unset: `make engines` builds the example repository, `make serve` serves its demo_resnet
MODEL_REPOSITORY ?=
EXAMPLE_REPOSITORY := examples/model_repository
PYTEST_ARGS ?=

.PHONY: install test serve engines plan bench clean help

help:
	@echo "make serve                 install, build the demo engines, plan, serve on http://127.0.0.1:8000"
	@echo "make test                  install and run the test suite (CPU only)"
	@echo "make engines MODEL_REPOSITORY=DIR [GPU_CLASS=T4]   build + profile every model of DIR"
	@echo "                           (GPU class auto-detected if unset; default DIR: the example repository)"
	@echo "make serve MODEL_REPOSITORY=DIR   serve every model of DIR with real engines"
	@echo "make plan                  plan the paper's group 2 on L4+T4 from the shared profiles"
	@echo "make bench                 run the benchmarks under scripts/"

$(VENV)/.installed: pyproject.toml setup.py $(wildcard ppipe_trt/_native/*.pyx)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	PPIPE_PROFILES=$(PROFILES) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

serve: install
	PPIPE_PROFILES=$(PROFILES) $(BIN)/ppipe serve $(if $(MODEL_REPOSITORY),--model-repository $(MODEL_REPOSITORY),)

engines: install
	$(BIN)/ppipe engines build $(if $(MODEL),$(MODEL),--model-repository $(or $(MODEL_REPOSITORY),$(EXAMPLE_REPOSITORY))) $(if $(GPU_CLASS),--gpu-class $(GPU_CLASS),)

plan: install
	$(BIN)/ppipe plan --profiles $(PROFILES) --paper-group 2 --paper-cluster L4-T4

bench: install
	$(BIN)/python scripts/bench_planner.py --profiles $(PROFILES)

clean:
	rm -rf $(VENV) .pytest_cache
