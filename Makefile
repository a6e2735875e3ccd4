# rwdet: two commands a newcomer needs are `make demo` and `make test`; both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo demo-cls demo-det demo-popup test test-fast docs-numbers mutate gpu-check lint format clean

setup:
	@bash scripts/setup.sh

# The main job on the embedded default data: classification on Fashion-MNIST, then the
# classification -> detection transfer on the deepforest tree-crown photos.
demo: setup demo-cls demo-det

demo-cls:
	$(PY) tools/train_cls.py --gen ws

demo-det:
	bash tools/demo_det.sh

# Edge-popup on the embedded data: a Conv4 whose random weights are never trained, only the
# scores choosing half of them, next to the same net trained (docs/studies.md). ~5 min on CPU.
demo-popup: setup
	$(PY) tools/study.py configs/studies/popup_k_sweep.yaml --preset demo

test: setup
	@bash scripts/run_tests.sh

# Fast tests only (skips the `slow` marker).
test-fast: setup
	@bash scripts/run_tests.sh -m "not slow"

# Every deterministic table the README and docs quote, checked against the code (a minute or
# two; `make test` checks the quick rows). Regenerate: tools/docs_numbers.py static --write;
# the measured numbers: tools/docs_numbers.py demo|transfer --write (minutes to an hour).
docs-numbers: setup
	$(PY) tools/docs_numbers.py static --check

# Mutation testing of the modules that encode the papers' rules (docs/testing.md). Slow (minutes);
# not part of `make test`. Fails on a surviving mutant that docs/testing.md does not list.
mutate: setup
	@bash scripts/mutate.sh

# The prepared GPU check (scripts/gpu_check.sh): gpu tests, benchmarks and torchrun smokes in
# under 8 minutes on one H100/H200, one report in GPU_CHECK_OUT. Without CUDA: a dry run.
GPU_CHECK_OUT ?= output/gpu_check
gpu-check: setup
	@bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf .venv .cache .pytest_cache .ruff_cache
