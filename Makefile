# rwdet: two commands a newcomer needs are `make demo` and `make test`; both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo demo-cls demo-det test test-fast lint format clean

setup:
	@bash scripts/setup.sh

# The main job on the embedded default data: classification on Fashion-MNIST, then the
# classification -> detection transfer on the deepforest tree-crown photos.
demo: setup demo-cls demo-det

demo-cls:
	$(PY) tools/train_cls.py --gen ws

demo-det:
	bash tools/demo_det.sh

test: setup
	@bash scripts/run_tests.sh

# Fast tests only (skips the `slow` marker).
test-fast: setup
	@bash scripts/run_tests.sh -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf .venv .cache .pytest_cache .ruff_cache
