# kw_mm: `make demo` and `make test` set up .venv/ on first use, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kw_mm_ready

.PHONY: demo test lint venv clean-demo

$(STAMP):
	bash tools/setup_venv.sh

venv: $(STAMP)

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -q -rs -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf data/demo_shapes work_dirs/demo
