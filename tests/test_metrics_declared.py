"""gpuphase/model/metrics.yaml is the one source of truth: what is emitted, what is declared and what is
documented must be the same set, with the same types, help and labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuphase.exporters import docs
from gpuphase.exporters.collectors import COLLECTORS
from gpuphase.exporters.registry import render
from gpuphase.model import metricdefs
from tests.views import rich_view

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = metricdefs.load()


def emitted_families() -> dict:
    return {family.name: family for family in text_string_to_metric_families(render(rich_view()))}


def sample_name(family_name: str) -> str:
    """The text parser names counter families without _total; metrics.yaml names them with it."""
    return family_name if family_name in DEFINITIONS else family_name + "_total"


def test_every_emitted_family_is_declared_with_its_type_help_and_labels():
    for family_name, family in emitted_families().items():
        name = sample_name(family_name)
        assert name in DEFINITIONS, f"{name} is emitted but not declared in gpuphase/model/metrics.yaml"
        definition = DEFINITIONS[name]
        assert family.type == definition.type, name
        assert family.documentation == definition.help, name
        for sample in family.samples:
            assert set(sample.labels) == set(definition.labels), (
                f"{name}: labels {sorted(sample.labels)} != declared {definition.labels}"
            )


def test_every_declared_metric_is_emitted_by_the_rich_view():
    emitted = {sample_name(name) for name in emitted_families()}
    assert sorted(set(DEFINITIONS) - emitted) == []


def test_every_collector_of_metrics_yaml_has_a_module():
    assert list(COLLECTORS) == metricdefs.collectors()


@pytest.mark.parametrize("definition", DEFINITIONS.values(), ids=lambda d: d.name)
def test_naming_conventions(definition):
    """Base-unit suffixes, _total exactly on counters, and gpu/uuid first on per-GPU series."""
    assert definition.type in ("gauge", "counter")
    assert definition.name.endswith("_total") == (definition.type == "counter")
    if definition.unit:
        # prometheus_client silently appends the unit to a name lacking it; that would rename the metric.
        assert definition.family_name.endswith("_" + definition.unit)
    if "gpu" in definition.labels or "uuid" in definition.labels:
        assert definition.labels[:2] == ("gpu", "uuid")
    assert definition.help.strip() and "\n" not in definition.help


def test_docs_metrics_md_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "-m", "gpuphase.exporters.docs", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_docs_check_detects_a_stale_file(tmp_path):
    stale = tmp_path / "metrics.md"
    stale.write_text(docs.render().replace("gpu_up", "gpu_upp"), encoding="utf-8")
    assert docs.main(["--check", "--output", str(stale)]) == 1
    assert docs.main(["--output", str(stale)]) == 0
    assert docs.main(["--check", "--output", str(stale)]) == 0


def test_docs_list_every_metric_once():
    text = docs.render()
    for name in DEFINITIONS:
        assert text.count(f"| `{name}` |") == 1, name


def test_promtool_finds_no_lint_problems_in_the_rich_view():
    from tests.conftest import require_tool

    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=render(rich_view()), capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )
