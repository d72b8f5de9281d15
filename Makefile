# `make demo` runs the quickstart through `igat serve` (API + dispatcher + local Ray head) and prints its results;
# `make test` runs ruff (pyproject.toml's [tool.ruff]), then the test suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml requirements-mlflow.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-mlflow.txt 2>&1 \
		| grep -v "^WARNING: Location\|^ERROR: pip's dependency resolver\|torchattacks .* requires requests" || true
	$(PY) -c "import torch, torchvision, ray, fastapi, sqlalchemy, torchattacks, mlxtend, sklearn, igat_core"
	$(PY) -c "import mlflow"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m service.demo --spec examples/quickstart.yaml

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q --timeout=900

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf runs var
