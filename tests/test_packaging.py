"""Deployment artefacts checked with the real tools: systemd-analyze, the install script run as
root into a temporary prefix, kubectl kustomize + kubernetes-validate, and the Dockerfile's rules.

In CI (CI=true) a missing tool is a failure, not a skip (conftest.require_tool)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import IN_CI, require_tool

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "gpuphase.service"
INSTALL_SH = PACKAGING / "install.sh"


def _run(*argv, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _unit_directives(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (systemd allows repeated keys, so configparser cannot)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


# --- systemd ----------------------------------------------------------------------------------------


def _verify(unit_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify; warnings (unknown keys, bad values) go to stderr with exit code 0,
    so a clean verify means exit 0 AND no output."""
    return _run(require_tool("systemd-analyze"), "verify", "--man=no", unit_path, check=False)


@pytest.fixture
def unit_with_executable(tmp_path):
    """The shipped unit with ExecStart pointing at an executable that exists (verify checks that)."""
    executable = tmp_path / "bin" / "gpuphase"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    text = UNIT.read_text().replace("/opt/gpuphase/venv/bin/gpuphase", str(executable))
    assert str(executable) in text
    unit = tmp_path / "gpuphase.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_cleanly(unit_with_executable):
    result = _verify(unit_with_executable)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda t: t.replace("ProtectSystem=strict", "ProtectSystm=strict"), "Unknown key"),
        (lambda t: t.replace("Type=notify", "Type=notifyy"), "Failed to parse service type"),
        (lambda t: re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/gpuphase", t), "is not executable"),
    ],
)
def test_verify_catches_a_broken_copy(unit_with_executable, tmp_path, breakage, complaint):
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken = broken_dir / "gpuphase.service"
    broken.write_text(breakage(unit_with_executable.read_text()))
    result = _verify(broken)
    assert complaint in result.stdout + result.stderr


def test_unit_runs_unprivileged_hardened_and_notifies():
    d = _unit_directives(UNIT.read_text())
    expected = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"], "Service.User": ["gpuphase"],
        "Service.SupplementaryGroups": ["video"], "Service.NoNewPrivileges": ["yes"],
        "Service.CapabilityBoundingSet": [""], "Service.ProtectSystem": ["strict"],
        "Service.ProtectHome": ["yes"], "Service.PrivateTmp": ["yes"], "Service.Restart": ["on-failure"],
        "Service.EnvironmentFile": ["-/etc/default/gpuphase"],
        "Service.ExecStart": ["/opt/gpuphase/venv/bin/gpuphase run $GPUPHASE_ARGS"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
    }
    assert {key: d.get(key) for key in expected} == expected
    # The GPU must stay reachable: no private /dev, and the NVIDIA device nodes allowed.
    assert "Service.PrivateDevices" not in d
    assert "char-nvidia* rw" in d["Service.DeviceAllow"]
    # Without the agent pinging, a watchdog would restart it every WatchdogSec.
    assert "Service.WatchdogSec" not in d
    for limit in ("Service.MemoryMax", "Service.CPUQuota"):
        assert limit in d


def test_default_file_names_only_real_settings():
    """Every GPUPHASE_* variable in the shipped /etc/default file is one the agent reads."""
    from agent.config import OPTIONS

    known = {option.env for option in OPTIONS} | {"GPUPHASE_ARGS", "GPUPHASE_CONFIG"}
    text = (PACKAGING / "systemd" / "gpuphase.default").read_text()
    named = set(re.findall(r"^#?(GPUPHASE_[A-Z_]+)=", text, flags=re.M))
    assert named and named <= known, named - known


# --- install.sh ---------------------------------------------------------------------------------------


@pytest.fixture
def source_copy(tmp_path):
    """The distribution's sources copied out, so the build's build/ and *.egg-info stay out of the repo."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    (source / "README.md").touch()
    for package in ("agent", "exporters"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def _require_offline_build() -> None:
    """pip builds the sdist with --no-build-isolation, i.e. with the installed setuptools, which
    needs bdist_wheel (the `wheel` package, or setuptools >= 70.1)."""
    try:
        import wheel  # noqa: F401
    except ImportError:
        import setuptools

        if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
            message = "building offline needs the `wheel` package (pip install wheel)"
            pytest.fail(message) if IN_CI else pytest.skip(message)


def test_install_script_into_a_temporary_prefix(tmp_path, source_copy):
    if os.geteuid() != 0:
        message = "install.sh must run as root (it creates a system user)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    _require_offline_build()
    create_user = shutil.which("useradd") is not None
    user = f"gpuphase-t{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PREFIX": str(tmp_path / "opt"), "SYSTEMD_DIR": str(tmp_path / "systemd"),
        "ETC_DIR": str(tmp_path / "etc"), "GPUPHASE_USER": user,
        # No network: the venv sees the already-installed dependencies and uses their pip.
        "VENV_ARGS": "--system-site-packages --without-pip",
        "PIP_ARGS": "--no-deps --no-build-isolation --no-index",
    }
    user_flags = [] if create_user else ["--no-user"]
    try:
        out = _run("bash", INSTALL_SH, "--source", source_copy, "--no-systemctl", *user_flags, env=env).stdout
        assert "systemctl not run" in out
        gpuphase = tmp_path / "opt" / "venv" / "bin" / "gpuphase"
        assert "run" in _run(gpuphase, "--help").stdout
        if create_user:
            assert _run("id", "-u", user).returncode == 0

        unit = tmp_path / "systemd" / "gpuphase.service"
        d = _unit_directives(unit.read_text())
        assert d["Service.ExecStart"] == [f"{gpuphase} run $GPUPHASE_ARGS"]
        assert d["Service.User"] == [user] and d["Service.Group"] == [user]
        result = _verify(unit)  # the installed unit, with its real executable
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

        defaults = tmp_path / "etc" / "default" / "gpuphase"
        assert defaults.read_text() == (PACKAGING / "systemd" / "gpuphase.default").read_text()
        defaults.write_text("GPUPHASE_LOG_LEVEL=debug\n")
        again = _run("bash", INSTALL_SH, "--source", source_copy, "--no-systemctl", *user_flags, env=env).stdout
        assert "kept existing" in again and (create_user is False or "exists" in again)
        assert defaults.read_text() == "GPUPHASE_LOG_LEVEL=debug\n"  # the admin's settings survive

        _run("bash", INSTALL_SH, "--uninstall", "--no-systemctl", env=env)
        assert not unit.exists() and not (tmp_path / "opt").exists() and defaults.exists()
    finally:
        purge = _run("bash", INSTALL_SH, "--uninstall", "--purge", "--no-systemctl", env=env, check=False)
    assert purge.returncode == 0, purge.stderr
    assert not (tmp_path / "etc" / "default" / "gpuphase").exists()
    assert subprocess.run(["id", "-u", user], capture_output=True).returncode != 0


def test_install_script_refuses_unknown_arguments():
    result = _run("bash", INSTALL_SH, "--frobnicate", check=False)
    assert result.returncode != 0 and "unknown argument --frobnicate" in result.stderr
