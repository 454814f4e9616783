#!/usr/bin/env bash
# A Debian 12 base image made without any registry: debootstrap (minbase) from the Debian mirror that this
# host's apt already uses, imported into podman. Prints the image's name, localhost/mugs-debian-base:KEY.
#   tools/debian-base.sh [CACHE_DIR]      (as root; default CACHE_DIR: ~/.cache/mugs-pipeline)
# The root filesystem's tarball is kept in CACHE_DIR, named after a hash of everything it is made from
# (suite, variant, mirror, debootstrap's version): a second call only imports it. Delete CACHE_DIR to reclaim
# its ~120 MB. Override the mirror with DEBIAN_MIRROR=URL.
set -euo pipefail
CACHE=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mugs-pipeline}
SUITE=bookworm
VARIANT=minbase

# the first Debian archive in apt's sources: deb822 (`URIs:`) or one-line (`deb URL SUITE ...`) format
apt_mirror() {
  local sources
  sources=$(find /etc/apt/sources.list /etc/apt/sources.list.d -maxdepth 1 -type f \( -name '*.list' -o -name '*.sources' \) 2>/dev/null | LC_ALL=C sort)
  [ -n "$sources" ] || return 0
  # shellcheck disable=SC2086  # one path per word: apt's file names have no spaces
  awk -v suite="$SUITE" '
      /^URIs:/ { uri = $2 }
      /^Suites:/ && uri != "" { for (i = 2; i <= NF; i++) if ($i == suite) { print uri; exit } }
      /^deb / { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) break; if ($(i + 1) == suite) { print $i; exit } }' $sources
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
if [ -z "$MIRROR" ]; then
  echo "debian-base.sh: no '$SUITE' archive in /etc/apt/sources.list*; set DEBIAN_MIRROR=URL" >&2
  exit 2
fi

KEY=$(printf '%s\n' "$SUITE" "$VARIANT" "$MIRROR" "$(debootstrap --version)" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debian-$SUITE-$KEY.tar
IMAGE=localhost/mugs-debian-base:$KEY
if [ ! -f "$TARBALL" ]; then
  mkdir -p "$CACHE"
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOTFS" "$TARBALL.partial"' EXIT
  debootstrap --variant="$VARIANT" "$SUITE" "$ROOTFS" "$MIRROR" >&2
  # apt's downloaded packages are not part of the base
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.partial" .
  mv "$TARBALL.partial" "$TARBALL"
  # a tarball of other inputs (another mirror or debootstrap) is not used again: the cache stays one base
  find "$CACHE" -maxdepth 1 -name "debian-$SUITE-*.tar" ! -name "${TARBALL##*/}" -delete
fi
if ! podman image exists "$IMAGE"; then
  podman import --quiet "$TARBALL" "$IMAGE" >/dev/null
fi
echo "$IMAGE"
