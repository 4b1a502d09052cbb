# Both targets create their own virtual environment (.venv) and install what they need.
# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DOCS_STAMP := $(VENV)/.docs-stamp

.PHONY: demo test install clean docs explore

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/taxadiffusion demo

RUN ?= runs/demo/progressive
explore: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/taxadiffusion explore $(RUN)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadgroup

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCS_STAMP)

# the generated pages must be current (tools/gen_docs.py), then a strict build: a broken link, a
# missing anchor or a page left out of the nav fails
docs: $(DOCS_STAMP)
	$(PY) tools/gen_docs.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache
