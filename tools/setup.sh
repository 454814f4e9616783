#!/usr/bin/env bash
# Set up everything the demo and the tests need on a fresh Debian machine: system packages (when
# root), a virtual environment with the pinned torch pair, and this package with its extras.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="dataset-fashion-mnist slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
missing=$(for p in $SYSTEM_PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >/dev/null 2>&1 || {
      apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
      apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >/dev/null
    }
  else
    echo "[setup] missing system packages: $missing" >&2
    echo "[setup] install them with: sudo apt-get install -y --no-install-recommends $missing" >&2
    echo "[setup] (the demo needs dataset-fashion-mnist; the SLURM tests need the others)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] python3 -m venv $VENV"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# this exact pair: pip takes both from this machine's local wheel cache (other pairs download GBs)
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -e '.[workflow,dev]'
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch, timm, mugs; print("torch", torch.__version__, "timm", timm.__version__, "mugs", mugs.__version__)')"
