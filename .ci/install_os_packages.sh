#!/usr/bin/env bash
# Install the operating-system packages the test suite needs (Debian/Ubuntu, as root or via
# sudo). Idempotent and quiet: packages already installed are not touched, and apt-get is not
# run at all when nothing is missing.
#
#   slurm-wlm, munge   the local Slurm cluster of tests/slurm_fixtures.py (slurmctld, slurmd,
#                      the clients and their plugins; munged with its own key)
#
# Add packages to PACKAGES below (one reason each in the list above).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(slurm-wlm munge)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[install_os_packages] already installed: ${PACKAGES[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "[install_os_packages] error: no apt-get here; install ${missing[*]} by hand" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || {
    echo "[install_os_packages] error: need root (or sudo) to install ${missing[*]}" >&2
    exit 1
  }
  SUDO=(sudo --preserve-env=DEBIAN_FRONTEND)
fi

echo "[install_os_packages] installing ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq \
       && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}"; } >"$log" 2>&1; then
  echo "[install_os_packages] error: apt-get failed:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
echo "[install_os_packages] done"
