#!/usr/bin/env bash
# Build envs/Dockerfile with podman (as root), with the package indexes and certificates this host uses:
#   tools/build-image.sh TAG [BASE_IMAGE]
# - the indexes of the host's pip configuration (`pip config list`, PIP_* variables): uv in the build uses them
#   besides PyPI, and local ones (file:// URLs, find-links directories) are mounted read-only into the build;
# - the host's extra CA certificates (/usr/local/share/ca-certificates/*.crt), as EXTRA_CA_CERTS.
# A host without either builds from plain PyPI. BASE_IMAGE: default the Dockerfile's (the CUDA base);
# tools/debian-base.sh makes one without a registry. Builds run niced, with chroot isolation (no nested
# namespaces needed), and reuse the dependency layer while envs/ and the indexes are unchanged.
set -euo pipefail
TAG=${1:?usage: tools/build-image.sh TAG [BASE_IMAGE]}
BASE_IMAGE=${2:-}
cd "$(dirname "$0")/.."

pip_setting() {  # the value pip would use for a setting, e.g. find-links, from its config files (none: no pip)
  { python3 -m pip config list 2>/dev/null || true; } | sed -n "s/^[^.]*\\.$1='\\(.*\\)'\$/\\1/p" | tail -n 1
}
index_url=${PIP_INDEX_URL:-$(pip_setting index-url)}
extra_index_urls=${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}
find_links=${PIP_FIND_LINKS:-$(pip_setting find-links)}

arguments=(--isolation chroot --layers -f envs/Dockerfile --ignorefile envs/Dockerfile.dockerignore -t "$TAG")
[ -z "$BASE_IMAGE" ] || arguments+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
mounted=" "
for location in $index_url $extra_index_urls $find_links; do
  directory=${location#file://}
  directory=${directory%/simple}
  if [ "${directory:0:1}" = / ] && [ -d "$directory" ] && [[ $mounted != *" $directory "* ]]; then
    arguments+=(--volume "$directory:$directory:ro")
    mounted+="$directory "
  fi
done
[ -z "$index_url" ] || arguments+=(--build-arg "UV_INDEX_URL=$index_url" --build-arg "PIP_INDEX_URL=$index_url")
[ -z "$extra_index_urls" ] || arguments+=(--build-arg "UV_EXTRA_INDEX_URL=$extra_index_urls")
[ -z "$find_links" ] || arguments+=(--build-arg "UV_FIND_LINKS=$find_links")
# with several indexes, each locked version is taken from whichever has it (the lock pins every version)
[ -z "$extra_index_urls$find_links" ] || arguments+=(--build-arg UV_INDEX_STRATEGY=unsafe-best-match)
shopt -s nullglob
certificates=(/usr/local/share/ca-certificates/*.crt)
[ ${#certificates[@]} = 0 ] || arguments+=(--build-arg "EXTRA_CA_CERTS=$(cat "${certificates[@]}")")

nice podman build "${arguments[@]}" .
