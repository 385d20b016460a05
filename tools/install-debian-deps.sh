#!/usr/bin/env bash
# Install the Debian packages whose tools check the generated configs (the daemons'
# own checkers) and that the daemon tests start. Idempotent: does nothing when every
# package is present. Needs root (CI runs as root); services must not start on install.
set -euo pipefail

PACKAGES=(
  haproxy keepalived nginx-light rsyslog
  prometheus prometheus-alertmanager prometheus-blackbox-exporter prometheus-node-exporter
  mariadb-server mariadb-backup galera-4 socat
  redis-server redis-sentinel
  slurmctld slurmdbd slurm-client munge
  shellcheck cloud-init nftables iproute2 util-linux bsdutils openssl perl
  systemd logrotate graphviz curl python3-boto3 python3-yaml python3-redis python3-pymysql
  prometheus-mysqld-exporter prometheus-redis-exporter
)

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
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
