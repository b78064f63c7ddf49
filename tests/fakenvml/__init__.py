"""Build, load and steer the fake libnvidia-ml.so.1 (fake_nvml.c) that NVML tests run against.

The fake is loaded through the real pynvml ctypes layer, so struct layouts and error handling are
exercised exactly as with a driver. Typical use in a test module::

    @pytest.fixture(scope="session")
    def fake_nvml_library(tmp_path_factory):
        return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))

    @pytest.fixture
    def fake_nvml(fake_nvml_library, tmp_path):
        with FakeNvml(fake_nvml_library, tmp_path).activate() as fake:
            yield fake

    def test_something(fake_nvml):
        fake_nvml.control({"gpus": 2, "gpu1.gpm": 0})   # merged into the control file
        ...                                               # code under test calls pynvml
        assert fake_nvml.call_count("nvmlDeviceGetFieldValues") == 3

For a subprocess (the agent end to end): `env={**os.environ, **fake.environment()}`; the child's
pynvml then finds the fake through LD_LIBRARY_PATH. See fake_nvml.c's header for every control key.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
CONTROL_ENV = "FAKE_NVML_CONTROL"


def build_fake_nvml(directory: Path) -> Path:
    """Compile fake_nvml.c into directory/libnvidia-ml.so.1 (once per source version) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / LIBRARY_NAME
    stamp = directory / "source.sha256"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    if library.exists() and stamp.exists() and stamp.read_text() == digest:
        return library
    partial = directory / (LIBRARY_NAME + ".partial")
    command = ["gcc", "-shared", "-fPIC", "-O2", "-pthread", "-Wall", "-o", str(partial), str(SOURCE), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the fake NVML library failed:\n{' '.join(command)}\n{result.stderr}")
    partial.replace(library)
    stamp.write_text(digest)
    return library


def _format(value: Any) -> str:
    """Control-file text of a value: bools as 1/0, sequences comma-joined, {pid: bytes} as pid:bytes."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Mapping):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


class FakeNvml:
    """One private copy of the fake library plus its control file.

    Every instance copies the built library into its own directory: the dynamic loader then
    treats it as a separate library, so call counters and delivered-XID state start fresh for each
    test even though one compiled binary is shared.
    """

    def __init__(self, built_library: Path, directory: Path):
        self.directory = Path(directory) / "fakenvml"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.library_path = self.directory / LIBRARY_NAME
        shutil.copyfile(built_library, self.library_path)
        self.control_path = self.directory / "control"
        self._settings: dict[str, str] = {}
        self._lib: ctypes.CDLL | None = None
        self.control({})

    # --- steering ------------------------------------------------------------------------------

    def control(self, settings: Mapping[str, Any] | None = None, **simple: Any) -> None:
        """Merge settings into the control file (a value of None removes the key).

        Dotted keys go in the mapping (`{"gpu0.lost": True}`); plain ones may be keywords
        (`gpus=8`). The file is replaced atomically, so the library never reads half of it.
        """
        for key, value in {**(settings or {}), **simple}.items():
            if value is None:
                self._settings.pop(key, None)
            else:
                self._settings[key] = _format(value)
        text = "".join(f"{key}={value}\n" for key, value in self._settings.items())
        partial = self.control_path.with_suffix(".partial")
        partial.write_text(text)
        os.replace(partial, self.control_path)

    def environment(self) -> dict[str, str]:
        """Environment for a subprocess that should load this fake instead of a real driver."""
        inherited = os.environ.get("LD_LIBRARY_PATH", "")
        path = str(self.directory) + (os.pathsep + inherited if inherited else "")
        return {"LD_LIBRARY_PATH": path, CONTROL_ENV: str(self.control_path)}

    # --- observing -----------------------------------------------------------------------------

    def call_count(self, name: str) -> int:
        """Calls of an NVML function so far, or requests of a field ("field83") or GPM metric ("gpm10")."""
        function = self._library().fake_nvml_call_count
        function.restype = ctypes.c_ulonglong
        function.argtypes = [ctypes.c_char_p]
        return int(function(name.encode()))

    def sizeof(self, type_name: str) -> int:
        """sizeof() of an NVML struct as the C side lays it out, to compare with pynvml's ctypes."""
        function = self._library().fake_nvml_sizeof
        function.restype = ctypes.c_long
        function.argtypes = [ctypes.c_char_p]
        return int(function(type_name.encode()))

    def _library(self) -> ctypes.CDLL:
        if self._lib is None:
            self._lib = ctypes.CDLL(str(self.library_path))
        return self._lib

    # --- pointing pynvml at it -----------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator["FakeNvml"]:
        """Make this process's pynvml use this fake; restore pynvml and the environment afterwards."""
        import pynvml

        saved_env = os.environ.get(CONTROL_ENV)
        os.environ[CONTROL_ENV] = str(self.control_path)
        _reset_pynvml(pynvml, self._library())
        try:
            yield self
        finally:
            _reset_pynvml(pynvml, None)
            if saved_env is None:
                os.environ.pop(CONTROL_ENV, None)
            else:
                os.environ[CONTROL_ENV] = saved_env


def _reset_pynvml(pynvml: Any, library: ctypes.CDLL | None) -> None:
    """Swap the library pynvml talks to. Its function-pointer cache would otherwise keep the old one."""
    with pynvml.libLoadLock:
        pynvml.nvmlLib = library
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlLib_refcount = 0
