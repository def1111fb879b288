# The two set-up commands of the README:
#   make study   install into .venv if needed, then run the default study (dvc repro, all
#                its Ray stages on one local Ray instance: stages/local_ray.py)
#   make test    install into .venv if needed, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install study test test-fast clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

study: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m stages.local_ray dvc repro


test: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
