#!/usr/bin/env bash
# Install (or remove) the gpuphase agent as a systemd service on a bare-metal GPU host.
#
#   sudo packaging/install.sh [--source PIP_SPEC] [--no-systemctl] [--no-user]
#   sudo packaging/install.sh --uninstall [--purge] [--no-systemctl]
#
# Installing: creates the system user (idempotent), a virtualenv under $PREFIX/venv with gpuphase
# pip-installed from --source (default: the checkout this script lives in; any pip requirement
# works: a wheel file, a directory, "gpuphase==0.1.0"), the unit into $SYSTEMD_DIR and the settings
# file into $ETC_DIR/default/gpuphase (an existing one is never overwritten), then
# `systemctl daemon-reload`. It neither enables nor starts the service: that is your call.
# Uninstalling removes the unit and $PREFIX; --purge also removes the settings file and the user.
# The installed unit names this install's paths: ExecStart under $PREFIX, EnvironmentFile
# $ETC_DIR/default/gpuphase, User/Group $GPUPHASE_USER.
#
# Everything is relocatable, which is how tests install into a temporary directory:
#   PREFIX=/opt/gpuphase  SYSTEMD_DIR=/etc/systemd/system  ETC_DIR=/etc  GPUPHASE_USER=gpuphase
#   PYTHON=python3        VENV_ARGS=        (e.g. --system-site-packages)
#   PIP_ARGS=             (e.g. "--no-index --find-links /srv/wheels" on an offline host)
set -euo pipefail

PREFIX=${PREFIX:-/opt/gpuphase}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}
ETC_DIR=${ETC_DIR:-/etc}
GPUPHASE_USER=${GPUPHASE_USER:-gpuphase}
PYTHON=${PYTHON:-python3}
VENV_ARGS=${VENV_ARGS:-}
PIP_ARGS=${PIP_ARGS:-}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SOURCE=$REPO
ACTION=install
RUN_SYSTEMCTL=1
CREATE_USER=1
PURGE=0

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --source) [ $# -ge 2 ] || die "--source needs a value"; SOURCE=$2; shift 2 ;;
    --source=*) SOURCE=${1#--source=}; shift ;;
    --no-systemctl) RUN_SYSTEMCTL=0; shift ;;
    --no-user) CREATE_USER=0; shift ;;
    --uninstall) ACTION=uninstall; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and installs a systemd unit)"

# systemd takes absolute paths only (ExecStart=, EnvironmentFile=); a relative one would give a
# unit that fails to load.
for var in PREFIX SYSTEMD_DIR ETC_DIR; do
  case "${!var}" in
    /*) ;;
    *) die "$var must be an absolute path, not '${!var}'" ;;
  esac
done

UNIT=$SYSTEMD_DIR/gpuphase.service
DEFAULTS=$ETC_DIR/default/gpuphase

# systemd is the running init: the same test as sd_booted(3). In containers and chroots it is not,
# and systemctl would fail or, worse, talk to the host.
systemd_running() { [ "$RUN_SYSTEMCTL" -eq 1 ] && [ -d /run/systemd/system ]; }

create_user() {
  if id -u "$GPUPHASE_USER" >/dev/null 2>&1; then
    say "user $GPUPHASE_USER exists"
    return
  fi
  command -v useradd >/dev/null || die "useradd not found; create user $GPUPHASE_USER yourself or pass --no-user"
  useradd --system --user-group --no-create-home --home-dir / \
    --shell "$(command -v nologin || echo /usr/sbin/nologin)" \
    --comment "gpuphase GPU observability agent" "$GPUPHASE_USER"
  say "created system user $GPUPHASE_USER"
}

install_venv() {
  "$PYTHON" -m venv $VENV_ARGS "$PREFIX/venv"
  # Uninstall first so that reinstalling the same version from a changed checkout takes effect.
  "$PREFIX/venv/bin/python" -m pip uninstall --yes --quiet gpuphase >/dev/null 2>&1 || true
  # shellcheck disable=SC2086  # PIP_ARGS is a list of arguments
  "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$SOURCE"
  [ -x "$PREFIX/venv/bin/gpuphase" ] || die "pip did not install the gpuphase command into $PREFIX/venv/bin"
  if [ -f "$REPO/docs/install.md" ]; then
    install -D -m 0644 "$REPO/docs/install.md" "$PREFIX/share/doc/install.md"
  fi
  say "installed gpuphase into $PREFIX/venv"
}

# A value as literal text in the replacement of a sed s#...#...# command.
sed_literal() { printf '%s' "$1" | sed -e 's/[#&\\]/\\&/g'; }

install_unit() {
  # The unit in the repository names the default prefix, settings file and user; rewrite them for
  # this install (the settings file also in the comments that name it).
  install -d -m 0755 "$SYSTEMD_DIR"
  sed -e "s#/opt/gpuphase/#$(sed_literal "$PREFIX")/#g" \
      -e "s#/etc/default/gpuphase#$(sed_literal "$DEFAULTS")#g" \
      -e "s#^User=gpuphase\$#User=$(sed_literal "$GPUPHASE_USER")#" \
      -e "s#^Group=gpuphase\$#Group=$(sed_literal "$GPUPHASE_USER")#" \
      "$HERE/systemd/gpuphase.service" > "$UNIT.tmp"
  chmod 0644 "$UNIT.tmp"
  mv "$UNIT.tmp" "$UNIT"
  say "installed $UNIT"
  if [ -e "$DEFAULTS" ]; then
    say "kept existing $DEFAULTS (the shipped version is $HERE/systemd/gpuphase.default)"
  else
    install -D -m 0644 "$HERE/systemd/gpuphase.default" "$DEFAULTS"
    say "installed $DEFAULTS"
  fi
}

do_install() {
  if [ "$CREATE_USER" -eq 1 ]; then create_user; fi
  install_venv
  install_unit
  if systemd_running; then
    systemctl daemon-reload
    say "done; start it with: systemctl enable --now gpuphase"
  else
    say "done (systemctl not run); on the host: systemctl daemon-reload && systemctl enable --now gpuphase"
  fi
}

do_uninstall() {
  if systemd_running && [ -e "$UNIT" ]; then
    systemctl disable --now gpuphase.service || true
  fi
  rm -f "$UNIT"
  # Refuse to remove anything that does not look like our own prefix.
  if [ -d "$PREFIX" ]; then
    [ -d "$PREFIX/venv" ] || die "$PREFIX has no venv/; not removing it"
    rm -rf "$PREFIX"
  fi
  if [ "$PURGE" -eq 1 ]; then
    rm -f "$DEFAULTS"
    if id -u "$GPUPHASE_USER" >/dev/null 2>&1; then userdel "$GPUPHASE_USER"; fi
  fi
  if systemd_running; then systemctl daemon-reload; fi
  if [ "$PURGE" -eq 1 ]; then
    say "removed gpuphase, $DEFAULTS and user $GPUPHASE_USER"
  else
    say "removed gpuphase (kept $DEFAULTS and user $GPUPHASE_USER; --purge removes them)"
  fi
}

case "$ACTION" in
  install) do_install ;;
  uninstall) do_uninstall ;;
esac
