#!/usr/bin/env bash
# The build steps that envs/Dockerfile and envs/mugs.def share (as root, in a Debian/Ubuntu or RHEL-family image):
#   install.sh environment LOCK   Python 3.11 and exactly the locked packages in /opt/venv
#   install.sh package SRC        this package from its source tree (no dependencies: the lock has them all),
#                                 a consistency check, and the build digest in /opt/mugs/build-digest
# Nothing comes from outside the package indexes (PyPI, the distribution's archive). Settings, from the
# recipes' build arguments (all optional):
#   PYTHON            the interpreter /opt/venv is made with: a path or a command in the base image, or else the
#                     distribution's package of that name (default python3.11, the lock's Python)
#   EXTRA_CA_CERTS    PEM certificates to trust besides the distribution's (a TLS-inspecting proxy's)
#   UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_FIND_LINKS, UV_INDEX_STRATEGY, PIP_INDEX_URL
#                     other package indexes (a site mirror), read by uv and pip themselves; unset: PyPI
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
HERE=$(cd "$(dirname "$0")" && pwd)
UV=/opt/uv/bin/uv
# an index setting given as an empty build argument means "not set"
for setting in UV_INDEX_URL UV_EXTRA_INDEX_URL UV_FIND_LINKS UV_INDEX_STRATEGY PIP_INDEX_URL EXTRA_CA_CERTS; do
  [ -n "${!setting:-}" ] || unset "$setting"
done
# uv trusts the system's certificates (with EXTRA_CA_CERTS) and never downloads a Python
export UV_NO_CACHE=1 UV_LINK_MODE=copy UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never

# git: provenance records the commit when a rule runs a checkout's code (APPTAINERENV_PYTHONPATH)
install_system_packages() {
  local python_packages=()
  command -v "$PYTHON" >/dev/null || python_packages=("$PYTHON")
  if command -v apt-get >/dev/null; then
    [ ${#python_packages[@]} = 0 ] || python_packages+=("$PYTHON-venv")
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends ca-certificates git "${python_packages[@]}"
    rm -rf /var/lib/apt/lists/*
  elif command -v dnf >/dev/null; then
    [ ${#python_packages[@]} = 0 ] || python_packages+=("$PYTHON-pip")
    dnf install -y -q ca-certificates git-core "${python_packages[@]}"
    dnf clean all
  else
    echo "install.sh: the base image has neither apt-get nor dnf" >&2
    exit 2
  fi
}

# EXTRA_CA_CERTS into the system's trust store; prints the store's bundle, which pip is pointed at
trust_extra_certificates() {
  if [ -d /usr/local/share/ca-certificates ]; then
    write_extra_certificates /usr/local/share/ca-certificates
    update-ca-certificates > /dev/null
    echo /etc/ssl/certs/ca-certificates.crt
  else
    write_extra_certificates /etc/pki/ca-trust/source/anchors
    update-ca-trust
    echo /etc/pki/tls/certs/ca-bundle.crt
  fi
}

# one certificate per file in DIRECTORY: update-ca-certificates skips a file that holds several
write_extra_certificates() {
  printf '%s\n' "${EXTRA_CA_CERTS:-}" |
    awk -v directory="$1" '/-----BEGIN CERTIFICATE-----/ { n++ } n { print > (directory "/mugs-extra-" n ".crt") }'
}

case "$1" in
environment)
  install_system_packages
  PIP_CERT=$(trust_extra_certificates)
  export PIP_CERT
  lock_python=$(sed -n 's/.*--python-version \([0-9.]*\).*/\1/p' "$2")
  python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$python_version" != "$lock_python" ]; then
    echo "install.sh: PYTHON=$PYTHON is Python $python_version, but $2 is for Python $lock_python" >&2
    exit 2
  fi
  "$PYTHON" -m venv /opt/uv
  /opt/uv/bin/pip install --no-cache-dir -q -r "$HERE/build-requirements.txt"
  "$UV" venv --python "$PYTHON" --python-preference only-system /opt/venv
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
