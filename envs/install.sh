#!/usr/bin/env bash
# The build steps that envs/Dockerfile and envs/mugs.def share (as root, in an Ubuntu 24.04 CUDA image):
#   install.sh environment LOCK   Python 3.11 and exactly the locked packages in /opt/venv
#   install.sh package SRC        this package from its source tree (no dependencies: the lock has them all),
#                                 a consistency check, and the build digest in /opt/mugs/build-digest
set -euo pipefail
PYTHON_VERSION=3.11.18
HERE=$(cd "$(dirname "$0")" && pwd)
UV=/opt/uv/bin/uv
export UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 UV_LINK_MODE=copy

case "$1" in
environment)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # git: provenance records the commit when a rule runs a checkout's code (APPTAINERENV_PYTHONPATH)
  apt-get install -y -q --no-install-recommends ca-certificates git python3-venv
  rm -rf /var/lib/apt/lists/*
  python3 -m venv /opt/uv
  /opt/uv/bin/pip install --no-cache-dir -q -r "$HERE/build-requirements.txt"
  "$UV" venv --python "$PYTHON_VERSION" --python-preference only-managed /opt/venv
  # sync: exactly the lock, nothing more or less
  "$UV" pip sync --python /opt/venv/bin/python "$2"
  ;;
package)
  "$UV" pip install --python /opt/venv/bin/python --no-deps "$2"
  "$UV" pip check --python /opt/venv/bin/python
  /opt/venv/bin/python -c "import mugs.cli, submitit, timm, torch, torchvision; print('torch', torch.__version__)"
  mkdir -p /opt/mugs
  bash "$HERE/build-digest.sh" "$2" > /opt/mugs/build-digest
  ;;
*)
  echo "usage: $0 environment LOCK | package SRC" >&2
  exit 2
  ;;
esac
