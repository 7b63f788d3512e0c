#!/usr/bin/env bash
# The packaging check that .ci/run runs after the tests, and that runs alone too:
#
#   packaging/ci-check.sh [--bin-dir DIR]      (default: target/debug)
#
# 1. Builds both .deb files from the binaries in DIR (packaging/build-deb.sh, no compression,
#    so it takes seconds) and checks their metadata and contents.
# 2. As root: installs them with dpkg, checks binaries, config files (owner, mode), units, users
#    and state directories, enrolls a test agent with the installed binaries (certs init,
#    issue-agent, `runnel-agent check`), runs `systemd-analyze verify` on the installed units and
#    prints their `systemd-analyze security` exposure, then purges the packages.
# 3. As root: the same for the path without Debian (packaging/install.sh into a temporary
#    prefix, then --uninstall).
#
# It leaves the machine as it found it: users it created are removed again. Without root,
# steps 2 and 3 are skipped with the reason printed.
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin_dir="$repo/target/debug"
# Highest accepted `systemd-analyze security` exposure (0 = locked down, 10 = unprotected).
# The units score 1.1 with systemd 252: what is left is network access, which they need.
max_exposure="2.0"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "ci-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

n_checks=0
fail() {
  echo "FAILED: $*" >&2
  exit 1
}
check() {
  # check DESCRIPTION COMMAND...: runs COMMAND, fails the script with DESCRIPTION if it fails.
  local description="$1"
  shift
  if ! "$@" >/dev/null; then
    fail "$description ($*)"
  fi
  n_checks=$((n_checks + 1))
}
mode_owner() { stat -c '%a %U:%G' "$1"; }

work="$(mktemp -d)"
# The service users run installed binaries from here (install.sh's prefix).
chmod 0755 "$work"
created_users=()
cleanup() {
  local status=$?
  if [[ "$(id -u)" == 0 ]]; then
    for name in runnel-agent runnel-aggregator; do
      if dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'installed'; then
        dpkg --purge "$name" >/dev/null 2>&1 || true
      fi
    done
    for user in "${created_users[@]}"; do
      userdel "$user" 2>/dev/null || true
      groupdel "$user" 2>/dev/null || true
    done
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

echo "--- build the packages from $bin_dir"
for name in runnel-agent runnel-aggregator; do
  [[ -x "$bin_dir/$name" ]] ||
    fail "$bin_dir/$name is missing: build it first (cargo build --workspace --all-targets)"
done
mapfile -t debs < <("$here/build-deb.sh" --bin-dir "$bin_dir" --out "$work/debs" --compression none)
check "two packages built" test "${#debs[@]}" -eq 2
for deb in "${debs[@]}"; do
  name="$(dpkg-deb --field "$deb" Package)"
  echo "$(basename "$deb"): $(du -h "$deb" | cut -f1), Depends: $(dpkg-deb --field "$deb" Depends)"
  contents="$(dpkg-deb --contents "$deb")"
  config="$([[ $name == runnel-agent ]] && echo agent.toml || echo aggregator.toml)"
  for path in "./usr/bin/$name" "./usr/lib/systemd/system/$name.service" \
    "./usr/lib/sysusers.d/$name.conf" "./etc/runnel/$config" "./etc/runnel/certs/" \
    "./usr/share/doc/$name/OPERATIONS.md" "./usr/share/doc/$name/copyright"; do
    check "$name ships $path" grep -q " $path\$" <<<"$contents"
  done
  check "$name files belong to root" bash -c '! grep -v " root/root " <<<"$1"' _ "$contents"
  check "$name marks its config as a conffile" \
    bash -c 'dpkg-deb --ctrl-tarfile "$1" | tar -xO ./conffiles | grep -qx "/etc/runnel/$2"' _ "$deb" "$config"
done

if [[ "$(id -u)" != 0 ]]; then
  echo "--- skipped: installing with dpkg and install.sh needs root (this is uid $(id -u))"
  echo "packaging: $n_checks passed, 0 failed"
  exit 0
fi
for config in /etc/runnel/agent.toml /etc/runnel/aggregator.toml; do
  if [[ -e "$config" ]]; then
    echo "--- skipped: installing needs a host without Runnel, and $config exists here"
    echo "packaging: $n_checks passed, 0 failed"
    exit 0
  fi
done

for name in runnel-agent runnel-aggregator; do
  if ! getent passwd "$name" >/dev/null; then
    created_users+=("$name")
  fi
  if dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'installed'; then
    fail "$name is already installed here; the check would remove it (dpkg --purge $name first)"
  fi
done

# verify_units UNIT_FILE...: systemd-analyze verify, and the security exposure of each.
verify_units() {
  if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze not found (apt-get install systemd): units not verified"
    return
  fi
  # verify reads unit files offline: it needs no running systemd (PID 1 here may be anything).
  local output
  if ! output="$(systemd-analyze verify "$@" 2>&1)"; then
    fail "systemd-analyze verify $*:"$'\n'"$output"
  fi
  [[ -z "$output" ]] || echo "$output"
  n_checks=$((n_checks + 1))
  echo "systemd-analyze verify: OK ($*)"
  local unit exposure
  for unit in "$@"; do
    exposure="$(systemd-analyze security --offline=true "$unit" 2>/dev/null |
      sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')"
    [[ -n "$exposure" ]] || fail "no exposure level from systemd-analyze security $unit"
    echo "systemd-analyze security: $(basename "$unit") exposure $exposure (at most $max_exposure)"
    check "$(basename "$unit") exposure $exposure <= $max_exposure" \
      awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }'
  done
}

# check_installed BIN_DIR UNIT_DIR: what both install paths must leave behind.
check_installed() {
  local bin="$1" units="$2" name config
  for name in runnel-agent runnel-aggregator; do
    config="$([[ $name == runnel-agent ]] && echo agent.toml || echo aggregator.toml)"
    check "$bin/$name runs" bash -c '"$1" --version >/dev/null' _ "$bin/$name"
    check "user $name exists" getent passwd "$name"
    check "user $name has no login shell" \
      bash -c 'getent passwd "$1" | cut -d: -f7 | grep -Eq "(nologin|false)$"' _ "$name"
    check "/var/lib/$name is $name's alone" test "$(mode_owner "/var/lib/$name")" = "700 $name:$name"
    check "/etc/runnel/$config is root's, readable by $name" \
      test "$(mode_owner "/etc/runnel/$config")" = "640 root:$name"
    check "$units/$name.service exists" test -f "$units/$name.service"
    check "$units/$name.service starts $bin/$name" grep -q "^ExecStart=$bin/$name " "$units/$name.service"
  done
  check "runnel-agent check rejects the default config without certificates" \
    bash -c '! "$1/runnel-agent" check --config /etc/runnel/agent.toml >/dev/null 2>&1' _ "$bin"

  # Enroll a test agent as docs/OPERATIONS.md says, with the installed binaries.
  local ca="$work/ca"
  "$bin/runnel-aggregator" certs init --dir "$ca" --san aggregator.example.com >/dev/null
  "$bin/runnel-aggregator" certs issue-agent --dir "$ca" --name ci-check-agent --out "$work/enroll" >/dev/null
  install -m 0644 "$ca/ca.pem" /etc/runnel/certs/ca.pem
  install -m 0644 "$work/enroll/ci-check-agent.pem" /etc/runnel/certs/agent.pem
  install -m 0640 -g runnel-agent "$work/enroll/ci-check-agent.key" /etc/runnel/certs/agent.key
  local checked
  checked="$(runuser -u runnel-agent -- "$bin/runnel-agent" check --config /etc/runnel/agent.toml 2>&1)" ||
    fail "runnel-agent check as runnel-agent after enrollment: $checked"
  check "the enrolled agent's id is its certificate's name" grep -q "ci-check-agent" <<<"$checked"
  rm -f /etc/runnel/certs/ca.pem /etc/runnel/certs/agent.pem /etc/runnel/certs/agent.key
  rm -rf "$ca" "$work/enroll"

  verify_units "$units/runnel-agent.service" "$units/runnel-aggregator.service"
}

echo "--- install the packages with dpkg"
dpkg --install "${debs[@]}"
check_installed /usr/bin /usr/lib/systemd/system
check "dpkg -L lists the unit" bash -c 'dpkg -L runnel-agent | grep -qx /usr/lib/systemd/system/runnel-agent.service'
echo "--- purge the packages"
dpkg --purge runnel-agent runnel-aggregator
for path in /usr/bin/runnel-agent /usr/bin/runnel-aggregator /etc/runnel/agent.toml \
  /etc/runnel/aggregator.toml /usr/lib/systemd/system/runnel-agent.service \
  /usr/lib/systemd/system/runnel-aggregator.service /var/lib/runnel-agent /var/lib/runnel-aggregator; do
  check "purge removed $path" test ! -e "$path"
done

echo "--- install without Debian packages (packaging/install.sh)"
prefix="$work/prefix"
mkdir -p "$prefix"
"$here/install.sh" --bin-dir "$bin_dir" --prefix "$prefix"
check_installed "$prefix/bin" /etc/systemd/system
"$here/install.sh" --uninstall --prefix "$prefix"
for name in runnel-agent runnel-aggregator; do
  check "uninstall removed $name.service" test ! -e "/etc/systemd/system/$name.service"
  check "uninstall removed $prefix/bin/$name" test ! -e "$prefix/bin/$name"
  check "uninstall kept /var/lib/$name" test -d "/var/lib/$name"
  rmdir "/var/lib/$name"
done
rm -f /etc/runnel/agent.toml /etc/runnel/aggregator.toml
rmdir /etc/runnel/certs /etc/runnel 2>/dev/null || true

echo "packaging: $n_checks passed, 0 failed"
