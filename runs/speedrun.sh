#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the most complete job nanoqwen has.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
.venv/bin/nanoqwen demo --out runs/out/demo
