#!/usr/bin/env bash
# Install the Debian packages whose tools check the generated configs (the daemons'
# own checkers) and that the daemon tests start. Idempotent: does nothing when every
# package is present. Needs root (CI runs as root); services must not start on install.
# The names are Debian 12's (the CI machine); on Ubuntu 24.04 (the pull-request runners)
# the few that differ are mapped below. Any other system gets Debian 12's names, and a
# name its archive lacks is an error that names it.
set -euo pipefail

PACKAGES=(
  haproxy keepalived nginx-light rsyslog
  prometheus prometheus-alertmanager prometheus-blackbox-exporter prometheus-node-exporter
  mariadb-server mariadb-backup galera-4 socat
  redis-server redis-sentinel
  slurmctld slurmdbd slurm-client munge
  shellcheck cloud-init nftables conntrack iproute2 util-linux bsdutils openssl perl
  systemd logrotate graphviz curl python3-boto3 python3-yaml python3-redis python3-pymysql python3-venv
  prometheus-mysqld-exporter prometheus-redis-exporter
  systemd-container debootstrap dpkg-dev
  fuse3 libfuse3-3
  chromium libnss3-tools
)

# /etc/os-release names the system (os-release(5)); read in a subshell so its variables
# stay out of this script. OS_RELEASE=<file> reads another system's, with --list to see
# the names it would get.
os_release=${OS_RELEASE:-/etc/os-release}
# shellcheck source=/dev/null
os_id=$( (. "$os_release" 2>/dev/null && echo "${ID:-unknown}") || echo unknown)
# shellcheck source=/dev/null
os_version=$( (. "$os_release" 2>/dev/null && echo "${VERSION_ID:-}") || true)
os="$os_id-$os_version"

# Ubuntu 24.04 (noble) names where Debian 12's differ. Checked against
# packages.ubuntu.com/noble:
# - nginx-light: in noble it is an empty package in universe (1.24.0-2ubuntu7) that only
#   depends on `nginx` and libnginx-mod-http-echo; the nginx binary (`nginx -t`) is in
#   `nginx` itself, in main. (Debian 12's nginx-light carries the binary.)
# Same name in noble, seen there: prometheus-alertmanager (0.26.0, universe),
# prometheus-node-exporter (1.7.0, universe), mariadb-backup (10.11, universe),
# galera-4 (26.4.16, universe), slurmctld and slurm-client (23.11.4, universe; slurmctld
# depends on munge). Not mapped, as the same name is expected but was not confirmed
# from here: prometheus-blackbox-exporter, prometheus-mysqld-exporter,
# prometheus-redis-exporter, slurmdbd, python3-boto3 and the rest of the list. The
# availability check below stops with the names a system's archive lacks.
# - chromium (the browser tests, rehearsal/browser.py): noble has no deb of it; its
#   `chromium-browser` only installs the snap, which needs snapd (absent in containers
#   and CI jobs) and whose confinement keeps the browser from `ip netns exec` and from an
#   NSS database outside ~/snap. So nothing is installed for it there: point
#   HPC_CHROMIUM at a Chrome or Chromium binary the system already has (GitHub's
#   ubuntu-24.04 image ships /usr/bin/google-chrome). libnss3-tools (certutil) has the
#   same name in noble.
declare -A RENAMED=()
case "$os" in
  debian-12) ;;
  ubuntu-24.04) RENAMED=([nginx-light]=nginx [chromium]="") ;;
  *) echo "install-debian-deps: $os is neither Debian 12 nor Ubuntu 24.04: trying Debian 12's package names" >&2 ;;
esac
kept=()
for p in "${PACKAGES[@]}"; do
  if [[ -v RENAMED[$p] ]]; then
    [ -n "${RENAMED[$p]}" ] && kept+=("${RENAMED[$p]}")
    [ -n "${RENAMED[$p]}" ] || echo "install-debian-deps: $p is not installed on $os (see the comment in $0)" >&2
  else
    kept+=("$p")
  fi
done
PACKAGES=("${kept[@]}")
if [ "${1:-}" = --list ]; then  # the names for this system, one a line; installs nothing
  printf '%s\n' "${PACKAGES[@]}"
  exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "debian packages: all ${#PACKAGES[@]} present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages (${missing[*]}); run as root: sudo $0" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
# Keep freshly installed daemons from starting (there is no init system here anyway).
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
if [ "$os" != debian-12 ]; then
  # Debian 12 is what CI runs, where apt-get's own error is enough; elsewhere say which
  # names this system's archive lacks, all at once, and where to map them.
  unknown=()
  for p in "${missing[@]}"; do
    apt-cache show --no-all-versions "$p" >/dev/null 2>&1 || unknown+=("$p")
  done
  if [ "${#unknown[@]}" -ne 0 ]; then
    echo "install-debian-deps: not in the package lists of $os: ${unknown[*]}" >&2
    echo "  (map each to this system's name in RENAMED in $0, with where the name comes from)" >&2
    exit 1
  fi
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
