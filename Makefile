# The two commands a fresh machine needs: `make demo` and `make test`. Both create .venv first
# (scripts/setup_venv.sh: the CPU build of torch where there is no GPU; a torch you already have is kept).
PY := .venv/bin/python
STAMP := .venv/.sds3d-installed
PROMPT ?= a blue torus

.PHONY: setup demo test lint bench gallery clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sds3d.cli generate "$(PROMPT)"

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q --durations=8

bench: $(STAMP)
	$(PY) -m sds3d.bench.cpu_step --out benchmarks
	$(PY) -m sds3d.bench.gallery --image docs/gallery.png --out benchmarks
	$(PY) -m sds3d.bench.prior_accuracy --out benchmarks

gallery: $(STAMP)
	$(PY) -m sds3d.bench.gallery --image docs/gallery.png --out benchmarks

clean:
	rm -rf .venv outputs .pytest_cache .ruff_cache .mypy_cache
