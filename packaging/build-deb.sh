#!/usr/bin/env bash
# Builds the Debian packages runnel-agent and runnel-aggregator from binaries that are already
# built, with `dpkg-deb --build --root-owner-group`: no cargo-deb, no debhelper, nothing compiled.
#
#   packaging/build-deb.sh [--bin-dir DIR] [--out DIR] [--version VERSION]
#                          [--compression xz|gzip|zstd|none] [--no-strip] [PACKAGE...]
#
#   --bin-dir      where runnel-agent and runnel-aggregator are (default: target/release;
#                  CI packages target/debug)
#   --out          where the .deb files go (default: target/debian)
#   --version      package version (default: the crate version + git commit count and hash,
#                  such as 0.0.0+git142.f043396, so every commit on main upgrades the last)
#   --compression  dpkg-deb compression (default: xz; CI uses none, which takes seconds)
#   --no-strip     keep symbols (binaries are stripped by default; the originals are untouched)
#   PACKAGE        runnel-agent and/or runnel-aggregator (default: both)
#
# Prints the path of each .deb it wrote, one a line, on stdout.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

bin_dir="$repo/target/release"
out_dir="$repo/target/debian"
version=""
compression="xz"
strip=1
packages=()

die() {
  echo "build-deb.sh: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --out) out_dir="${2:?--out needs a directory}"; shift 2 ;;
    --version) version="${2:?--version needs a version}"; shift 2 ;;
    --compression) compression="${2:?--compression needs xz, gzip, zstd or none}"; shift 2 ;;
    --no-strip) strip=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    runnel-agent | runnel-aggregator) packages+=("$1"); shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ ${#packages[@]} -gt 0 ]] || packages=(runnel-agent runnel-aggregator)
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
bin_dir="$(cd "$bin_dir" 2>/dev/null && pwd)" || die "--bin-dir $bin_dir does not exist"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

crate_version() {
  sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/$1/Cargo.toml" | head -n 1
}

if [[ -z "$version" ]]; then
  version="$(crate_version agent)"
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    version="$version+git$(git -C "$repo" rev-list --count HEAD).$(git -C "$repo" rev-parse --short HEAD)"
  fi
fi
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "--version $version is not a Debian version"
arch="$(dpkg --print-architecture)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The newest glibc symbol version a binary needs: the libc6 it depends on.
glibc_needed() {
  objdump -T "$1" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1
}

build_one() {
  local name="$1"
  local role config description summary
  case "$name" in
    runnel-agent)
      role=agent
      config=agent.toml
      summary="Runnel edge agent: events over HTTP and MQTT, durably buffered, shipped over QUIC"
      description=" Takes clickstream events over HTTP (generic JSON, the Snowplow tracker protocol,
 the Segment API) and telemetry over MQTT, commits them to a SQLite buffer before it
 acknowledges them, and ships them in compressed batches over QUIC with mutual TLS to a
 runnel-aggregator. Runs as the hardened systemd service runnel-agent.service."
      ;;
    runnel-aggregator)
      role=aggregator
      config=aggregator.toml
      summary="Runnel aggregator: lossless QUIC ingest from runnel-agents, SQL over the events"
      description=" Accepts batches from a fleet of runnel-agents over QUIC with mutual TLS, commits
 them to a SQLite write-ahead log before it acknowledges them, never stores an event twice,
 writes an hour-partitioned Delta Lake table and answers SQL (Apache DataFusion) over HTTP.
 Runs as the hardened systemd service runnel-aggregator.service."
      ;;
  esac
  local binary="$bin_dir/$name"
  [[ -x "$binary" ]] || die "$binary not found: build it first (cargo build --release -p $name)"

  local root="$work/$name"
  install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/systemd/system" \
    "$root/usr/lib/sysusers.d" "$root/etc/runnel/certs" "$root/usr/share/doc/$name/examples"
  install -m 0755 "$binary" "$root/usr/bin/$name"
  if [[ $strip == 1 ]]; then
    strip --strip-unneeded "$root/usr/bin/$name"
  fi
  install -m 0644 "$here/systemd/$name.service" "$root/usr/lib/systemd/system/$name.service"
  install -m 0644 "$here/sysusers.d/$name.conf" "$root/usr/lib/sysusers.d/$name.conf"
  install -m 0644 "$here/config/$config" "$root/etc/runnel/$config"
  for doc in "$repo"/docs/*.md; do
    install -m 0644 "$doc" "$root/usr/share/doc/$name/"
  done
  install -m 0644 "$here/README.md" "$root/usr/share/doc/$name/PACKAGING.md"
  install -m 0644 "$repo/config/examples/$role"*.toml "$root/usr/share/doc/$name/examples/"
  cat >"$root/usr/share/doc/$name/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: runnel
Source: the Runnel workspace

Files: *
Copyright: the Runnel authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

  for script in postinst prerm postrm; do
    sed -e "s|@NAME@|$name|g" -e "s|@CONFIG@|$config|g" -e "s|@DESCRIPTION@|${summary%%:*}|g" \
      "$here/debian/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
  done
  echo "/etc/runnel/$config" >"$root/DEBIAN/conffiles"

  local glibc depends
  glibc="$(glibc_needed "$root/usr/bin/$name")"
  depends="adduser"
  [[ -n "$glibc" ]] && depends="libc6 (>= $glibc), $depends"
  local needed
  needed="$(objdump -p "$root/usr/bin/$name" | awk '$1 == "NEEDED" { print $2 }')"
  if [[ "$needed" == *libgcc_s* ]]; then
    depends="libgcc-s1, $depends"
  fi
  local installed_size
  installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
  cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: Runnel maintainers <runnel@localhost>
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Description: $summary
$description
EOF
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"

  local deb="$out_dir/${name}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
  echo "$deb"
}

for package in "${packages[@]}"; do
  build_one "$package"
done
