# Fresh machine:  make demo  (set up, run the main job, print the leaderboard)
#                 make test  (set up, run the test suite)
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.poisonbench-installed
RESULTS ?= results
# make demo writes to a folder of its own, so the committed reference leaderboard and plots stay as they are
DEMO_RESULTS ?= results/demo

.PHONY: setup data demo leaderboard perf test test-fast clean

setup: data $(STAMP)

# System data: Fashion-MNIST images and WordNet (for EDA), from Debian/Ubuntu packages.
data:
	@if { [ -n "$$POISONBENCH_DATA" ] || [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; } \
	   && { [ -n "$$POISONBENCH_WORDNET" ] || [ -f /usr/share/wordnet/data.noun ]; }; then \
		echo "data: Fashion-MNIST and WordNet found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist wordnet-base; \
	else \
		echo "data: apt-get is not available. Get Fashion-MNIST's four IDX files into a folder and set"; \
		echo "      POISONBENCH_DATA=/that/folder, and WordNet 3.0 (dict folder) with POISONBENCH_WORDNET=/path."; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/bench run --attack badnet --defense clip,roclip --results $(DEMO_RESULTS)
	$(BIN)/bench report --results $(DEMO_RESULTS)

# The reference leaderboard: every attack x every defense x seeds 0-2 on cpu-small. Its rows and
# manifests are committed in results/reference (a session runs only the missing cells); the
# leaderboard goes to results/LEADERBOARD.md and its plots to results/reference/plots/ (committed).
REFERENCE ?= results/reference
REFERENCE_DEFENSES ?= clip,roclip,aug-only,density-filter,cleanclip,safeclip
leaderboard: setup
	$(BIN)/bench run --attack all --defense $(REFERENCE_DEFENSES) --seed 0-2 --jobs 2 --results $(REFERENCE)
	$(BIN)/bench report --results $(REFERENCE) --format md --out results/LEADERBOARD.md

# Harness speed on this machine (README, "Performance"): keep the machine otherwise idle.
perf: setup
	$(BIN)/bench perf --results $(RESULTS)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(RESULTS)/runs $(RESULTS)/manifests $(RESULTS)/checkpoints $(RESULTS)/locks $(RESULTS)/logs $(RESULTS)/perf .pytest_cache
