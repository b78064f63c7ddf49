#!/usr/bin/env bash
# Install the external tools the tests drive for real (Debian packages), if any is missing.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v gcc >/dev/null || need+=(gcc)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)  # the spin-down example script (tests/test_scaling_examples.py)
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)  # tests/test_e2e_report.py, benchmarks
command -v tmux >/dev/null || need+=(tmux)  # tests/test_top.py: `gpuphase top` in a real terminal
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
fi
if ! command -v kubectl >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends kubectl || apt-get install -y -q --no-install-recommends kubernetes-client
fi
