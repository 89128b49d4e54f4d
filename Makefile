# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tpu]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/ettin-jax describe recipes/tiny.yaml
	$(VENV)/bin/ettin-jax describe ettin-150m

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
