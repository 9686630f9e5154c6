#!/usr/bin/env bash
# Set up evav: a virtual environment in .venv with the package and its dev extras.
#   ./setup.sh            # CPU machine: installs the torch 2.13.0 CPU wheel first if no torch is present
#   EVAV_PYTHON=python3.11 ./setup.sh
# On a GPU cluster, create the venv with --system-site-packages over your own CUDA torch (or
# install it into .venv first): a present torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")"
PY=${EVAV_PYTHON:-python3}
VENV=${EVAV_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping the torch already present: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  # Never let a bare 'torch' requirement pull the multi-GB CUDA build onto a CPU machine.
  echo "[setup] installing the torch 2.13.0 CPU wheel"
  # A local '+cpu' wheel (pip's find-links) wins; else PyTorch's CPU index. Plain PyPI 'torch'
  # is never asked for: on Linux it is the CUDA build.
  pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

echo "[setup] installing evav and its dev extras"
pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import evav, torch; print(f'[setup] evav {evav.__version__}, torch {torch.__version__}')"
echo
echo "Set-up done. Run the tests with:   make test"
