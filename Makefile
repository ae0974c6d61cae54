# cbstore: the two commands a new user runs, plus the benchmark.
#   make demo   create .venv, install, then synth -> build -> encode -> fuse -> bench grid ->
#               report (demo/report/: report.md, report.html, figures/, results.csv)
#   make test   create .venv, install, run the test suite
#   make bench  performance benchmarks (by hand; not part of make test)
# Every step is idempotent: a second `make demo` reuses the source, the store, the embeddings
# and every finished run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CB     := $(BIN)/cbstore

DEMO        ?= demo
DEMO_STAYS  ?= 3000
DEMO_IMAGE  ?= 64
DEMO_TASKS  ?= mortality phenotype
DEMO_METHODS ?= lgbm-ehr lgbm-cxr lgbm-early lgbm-late latefusion
DEMO_CXR    := densenet121-res224-all

.PHONY: demo test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The synthetic MIMIC-shaped source (truth.json is written last).
$(DEMO)/source/truth.json: | $(STAMP)
	$(CB) synth $(DEMO)/source --stays $(DEMO_STAYS) --seed 0 --image-size $(DEMO_IMAGE) --overwrite

# The store (the manifest is written last; an interrupted build leaves no store).
$(DEMO)/store.zarr/cbstore_manifest.json: $(DEMO)/source/truth.json
	$(CB) build --mimic-iv $(DEMO)/source/mimic-iv --mimic-cxr $(DEMO)/source/mimic-cxr-jpg \
	    --out $(DEMO)/store.zarr --image-size $(DEMO_IMAGE) --overwrite

demo: $(STAMP) $(DEMO)/store.zarr/cbstore_manifest.json
	$(CB) info $(DEMO)/store.zarr
	$(CB) encode $(DEMO)/store.zarr --encoder ehr-stats
	$(CB) encode $(DEMO)/store.zarr --encoder $(DEMO_CXR) --weights random --input-size $(DEMO_IMAGE)
	@for task in $(DEMO_TASKS); do for method in $(DEMO_METHODS); do \
	    echo "== cbstore fuse --method $$method --task $$task"; \
	    $(CB) fuse $(DEMO)/store.zarr --method $$method --task $$task --fold 0 --seed 0 \
	        --out $(DEMO)/runs --no-progress || exit 1; \
	done; done
	$(CB) bench demo --store $(DEMO)/store.zarr --out $(DEMO)/runs --workers 2
	$(CB) report $(DEMO)/runs --per-label auroc --out $(DEMO)/report
