# transinv: every target sets up .venv itself (editable install), so a fresh clone needs only make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEIGHTS ?= auto

.PHONY: setup demo test test-extra test-all bench clean readme

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## demo: resnet18 on the built-in images, layer by layer, shifts 0..16 (pretrained weights where cached or downloadable, else random with a note)
demo: $(STAMP)
	$(BIN)/transinv measure resnet18 --weights $(WEIGHTS) --shift 0..16 --format table

## test: the whole suite except tests marked slow
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## test-extra: install the optional model sources (timm, transformers, ONNX Runtime), then the tests
## that need them and the tests marked slow (what `make test` leaves out)
test-extra: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,all]'
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/python -m pytest -q tests/test_zoo.py tests/test_outputs.py

## test-all: install the optional model sources, then every test, slow ones included
test-all: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,all]'
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

## bench: transinv against the bare forward pass; writes benchmarks/results.json
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

## readme: regenerate the README's flag and metric tables from the code
readme: $(STAMP)
	$(BIN)/python scripts/update_readme.py
