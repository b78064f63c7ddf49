"""Shared pytest setup: the repo root on sys.path, and the CI rule for missing prerequisites."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool. Missing: a failure in CI (a check must never silently vanish),
    a skip with the reason elsewhere. Tools pip installed next to the tests (kubernetes-validate)
    count too: scripts/test.sh runs .venv/bin/python without putting .venv/bin on PATH."""
    path = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if path:
        return path
    message = f"{name} is not installed (bash .ci/run installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory):
    """The fake libnvidia-ml.so.1 compiled once per session from tests/fakenvml/fake_nvml.c."""
    require_tool("gcc")
    from tests.fakenvml import build_fake_nvml

    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml-build"))
