"""The repository's layout as pyproject declares it: which folder each import package is built from,
and every module of gpuphase with its source. Shared by the packaging and layering tests."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
# import package -> the repository folder it is built from: gpuphase/ itself, then the mapped ones
PACKAGE_FOLDERS: dict[str, str] = {"gpuphase": "gpuphase", **SETUPTOOLS["package-dir"]}
PACKAGED_FOLDERS = tuple(PACKAGE_FOLDERS.values())


def module_files() -> dict[str, Path]:
    """Every module of the gpuphase package (dotted name -> file); a package is named by its __init__."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = (*package.split("."), *path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.setdefault(".".join(parts), path)
    return out
