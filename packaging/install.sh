#!/usr/bin/env bash
# Installs (or removes) runnel-agent and/or runnel-aggregator as systemd services on a host
# without Debian packages, from binaries already built or installed with `cargo install`.
# It does what the .deb does, by hand: the system user, the state directory, the default config
# under /etc/runnel (kept if present), the sysusers.d file and the hardened unit (its ExecStart
# pointed at the binary's real path).
#
#   sudo packaging/install.sh [--bin-dir DIR] [--prefix DIR] [PACKAGE...]
#   sudo packaging/install.sh --uninstall [--prefix DIR] [PACKAGE...]
#
#   --bin-dir    where the built binaries are (default: PREFIX/bin, where
#                `cargo install --root PREFIX` puts them); copied to PREFIX/bin unless already there
#   --prefix     installation prefix (default: /usr/local)
#   --uninstall  stop, disable and remove the units, binaries and sysusers.d files; keeps
#                /etc/runnel, /var/lib/runnel-* and the users (data and config are yours)
#   PACKAGE      runnel-agent and/or runnel-aggregator (default: both)
#
# Unit files go to /etc/systemd/system (the admin's directory, as nothing packages them), the
# docs to PREFIX/share/doc/PACKAGE.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
prefix="/usr/local"
bin_dir=""
uninstall=0
packages=()

die() {
  echo "install.sh: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    runnel-agent | runnel-aggregator) packages+=("$1"); shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ ${#packages[@]} -gt 0 ]] || packages=(runnel-agent runnel-aggregator)
[[ "$(id -u)" == 0 ]] || die "run as root (it creates users and writes /etc)"
[[ -n "$bin_dir" ]] || bin_dir="$prefix/bin"
unit_dir=/etc/systemd/system
systemd_running=0
[[ -d /run/systemd/system ]] && systemd_running=1

config_of() {
  case "$1" in
    runnel-agent) echo agent.toml ;;
    runnel-aggregator) echo aggregator.toml ;;
  esac
}

install_one() {
  local name="$1" config
  config="$(config_of "$name")"
  local binary="$bin_dir/$name"
  [[ -x "$binary" ]] || die "$binary not found: cargo install --locked --path ${name#runnel-} --root $prefix"
  if [[ "$(realpath "$binary")" != "$(realpath -m "$prefix/bin/$name")" ]]; then
    install -D -m 0755 "$binary" "$prefix/bin/$name"
  fi

  # The user: systemd-sysusers where systemd is installed, else useradd.
  install -D -m 0644 "$here/sysusers.d/$name.conf" "/usr/lib/sysusers.d/$name.conf"
  if ! getent passwd "$name" >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
      systemd-sysusers "/usr/lib/sysusers.d/$name.conf"
    else
      useradd --system --user-group --home-dir "/var/lib/$name" --no-create-home \
        --shell "$(command -v nologin || echo /bin/false)" "$name"
    fi
  fi
  install -d -m 0700 -o "$name" -g "$name" "/var/lib/$name"
  install -d -m 0755 /etc/runnel /etc/runnel/certs
  if [[ -e "/etc/runnel/$config" ]]; then
    echo "$name: keeping the existing /etc/runnel/$config"
  else
    install -m 0640 -o root -g "$name" "$here/config/$config" "/etc/runnel/$config"
  fi

  install -d -m 0755 "$prefix/share/doc/$name"
  install -m 0644 "$repo"/docs/*.md "$prefix/share/doc/$name/"
  sed -e "s|^ExecStart=/usr/bin/|ExecStart=$prefix/bin/|" \
    -e "s|file:///usr/share/doc/$name/|file://$prefix/share/doc/$name/|" \
    "$here/systemd/$name.service" >"$unit_dir/$name.service.tmp"
  chmod 0644 "$unit_dir/$name.service.tmp"
  mv "$unit_dir/$name.service.tmp" "$unit_dir/$name.service"
  echo "$name: installed $prefix/bin/$name, $unit_dir/$name.service, /etc/runnel/$config, /var/lib/$name"
}

uninstall_one() {
  local name="$1"
  if [[ $systemd_running == 1 ]]; then
    systemctl stop "$name.service" 2>/dev/null || true
  fi
  if [[ -e "$unit_dir/$name.service" ]]; then
    systemctl disable "$name.service" >/dev/null 2>&1 || true
  fi
  rm -f "$unit_dir/$name.service" "/usr/lib/sysusers.d/$name.conf" "$prefix/bin/$name"
  rm -rf "${prefix:?}/share/doc/$name"
  echo "$name: removed; kept /etc/runnel, /var/lib/$name and the user $name"
}

for package in "${packages[@]}"; do
  if [[ $uninstall == 1 ]]; then
    uninstall_one "$package"
  else
    install_one "$package"
  fi
done
if [[ $systemd_running == 1 ]]; then
  systemctl daemon-reload
fi
if [[ $uninstall == 0 ]]; then
  echo "next: edit /etc/runnel/*.toml, install certificates (docs/OPERATIONS.md), then" \
    "systemctl enable --now ${packages[*]}"
fi
