"""The import contract: layers with one direction, checked over every import statement (ast).

A module may import from its own layer only within its own group, and from any layer below. So
the model imports nothing of gpuphase, exporters never import the agent or its config, siblings
such as spans/ and phases/ stay independent, and the app and the CLI sit on top. A module that no
group claims fails the test: a new module is placed in a layer on purpose, not by accident.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.layout import ROOT, module_files

# Top to bottom. Each group is a module prefix; "=name" matches that module alone (a package's
# __init__ that should not pull its whole folder into its layer).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("gpuphase.__main__",),
    ("gpuphase.cli",),
    ("gpuphase.demo", "gpuphase.top", "gpuphase.report"),
    ("gpuphase.agent.app",),
    ("gpuphase.agent.config",),
    ("gpuphase.agent.sampler", "gpuphase.agent.spans", "gpuphase.agent.phases", "gpuphase.exporters",
     "gpuphase.dashboards"),
    ("gpuphase.agent.backends", "gpuphase.agent.processes", "gpuphase.agent.podresources", "gpuphase.web",
     "gpuphase.agent.latest", "gpuphase.agent.logs", "gpuphase.agent.sdnotify", "gpuphase.alerts"),
    ("gpuphase.agent._podresources_pb",),
    ("gpuphase.model", "=gpuphase", "=gpuphase.agent"),
)
# Third-party imports that belong to one place only.
ONLY_IN = {"pynvml": "gpuphase.agent.backends.nvml", "rich": "gpuphase.top"}
OLD_TOP_LEVEL = ("agent", "exporters", "alerts", "dashboards")


def _group(module: str) -> tuple[int, str] | None:
    """(layer, group) of a module: the longest matching group."""
    best: tuple[int, str] | None = None
    for layer, groups in enumerate(LAYERS):
        for group in groups:
            exact = group.startswith("=")
            name = group.lstrip("=")
            if module == name or (not exact and module.startswith(name + ".")):
                if best is None or len(name) > len(best[1]):
                    best = (layer, name)
    return best


def imported_modules(source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import in a source, lazy ones inside functions included.
    `from package import name` counts as importing package.name when that is a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else node.module))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    known = set(sources)
    out = []
    for module, source in sorted(sources.items()):
        own = _group(module)
        if own is None:
            out.append(f"{module}: in no layer; add it to tests/test_layers.py LAYERS")
            continue
        for line, target in imported_modules(source, known):
            top = target.split(".")[0]
            if top in ONLY_IN and not (module + ".").startswith(ONLY_IN[top] + "."):
                out.append(f"{module}:{line}: imports {target}; only {ONLY_IN[top]} may")
            if top != "gpuphase":
                continue
            theirs = _group(target)
            if theirs is None:
                continue  # reported as the target's own "in no layer"
            if theirs[0] < own[0] or (theirs[0] == own[0] and theirs[1] != own[1]):
                out.append(f"{module}:{line}: imports {target} ({theirs[1]}, layer {theirs[0]}) "
                           f"from {own[1]} (layer {own[0]})")
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {module: path.read_text(encoding="utf-8") for module, path in module_files().items()}


def test_no_module_imports_upward_or_across(sources):
    assert violations(sources) == []


@pytest.mark.parametrize("module, planted, offender", [
    ("gpuphase.exporters.http", "from gpuphase.agent.config import Config", "gpuphase.agent.config"),
    ("gpuphase.model.view", "import gpuphase.agent.sampler", "gpuphase.agent.sampler"),
    ("gpuphase.agent.phases.store", "def f():\n    from gpuphase.agent.spans import mapping", "gpuphase.agent.spans"),
    ("gpuphase.alerts.rules", "from gpuphase.exporters import registry", "gpuphase.exporters.registry"),
    ("gpuphase.agent.sampler", "import pynvml", "pynvml"),
])
def test_a_planted_upward_import_is_caught(sources, module, planted, offender):
    planted_sources = {**sources, module: sources[module] + "\n\n" + planted + "\n"}
    found = violations(planted_sources)
    assert len(found) == 1 and found[0].startswith(f"{module}:") and offender in found[0], found


def test_a_module_in_no_layer_is_caught(sources):
    found = violations({**sources, "gpuphase.newthing": ""})
    assert found == ["gpuphase.newthing: in no layer; add it to tests/test_layers.py LAYERS"]


def test_nothing_imports_the_old_top_level_names():
    """tests, benchmarks and scripts too: `import agent` would load a second copy of the modules
    from the repository root, beside the installed gpuphase.agent."""
    pattern = re.compile(rf"^\s*(?:from|import)\s+({'|'.join(OLD_TOP_LEVEL)})(?:\.|\s)", re.M)
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part in (".venv", ".git", "build") for part in path.relative_to(ROOT).parts):
            continue
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            line = path.read_text(encoding="utf-8").count("\n", 0, match.start()) + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert offenders == []


def test_every_module_file_is_in_the_layout():
    """module_files() reads pyproject's package-dir: a folder with modules outside it is not packaged."""
    packaged = {path for path in module_files().values()}
    for folder in ("agent", "exporters", "alerts", "dashboards", "gpuphase"):
        for path in (ROOT / folder).rglob("*.py"):
            assert path in packaged, Path(path).relative_to(ROOT)
