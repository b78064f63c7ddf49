#!/usr/bin/env bash
# Set up and run the whole test suite. Needs promtool, prometheus, amtool, alertmanager,
# kubectl and systemd-analyze on PATH (Debian: prometheus prometheus-alertmanager kubectl systemd);
# run as root it installs the missing Debian packages itself. With CI=true a missing tool fails
# its tests instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  scripts/install-tools.sh
fi
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
