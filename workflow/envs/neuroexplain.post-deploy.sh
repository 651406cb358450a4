#!/usr/bin/env bash
# Install this repository's package into the rule environment (editable, so code changes apply).
# Snakemake runs this from the working directory; NEUROEXPLAIN_SRC points elsewhere if that is
# not the repository root.
set -euo pipefail
python -m pip install --no-input -e "${NEUROEXPLAIN_SRC:-.}[workflow]"
