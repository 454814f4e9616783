#!/usr/bin/env bash
# Print the digest of what an image is built from: the lock, pyproject.toml and the package's Python files
# under ROOT (default: this checkout). The images report it as provenance.container_digest; running this on a
# checkout tells whether an image was built from it.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
digest=$(
  {
    sha256sum envs/requirements.lock pyproject.toml
    find mugs -type f -name '*.py' | LC_ALL=C sort | xargs sha256sum
  } | sha256sum
)
echo "build-sha256:${digest%% *}"
