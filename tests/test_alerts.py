"""Alert rules: generated file up to date, every alert complete and unit-tested with the real
promtool, runbook anchors present, the Alertmanager example valid and routing by severity.

promtool and amtool are real (Debian packages prometheus, prometheus-alertmanager); without
them these tests skip with the reason, except in CI where a missing tool fails (conftest)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gpuphase.alerts import rules
from gpuphase.alerts.rules import RuleConfig
from gpuphase.model.durations import format_duration
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
ALERTS_DIR = ROOT / "alerts"
RULES_FILE = ALERTS_DIR / "gpuphase-rules.yaml"
PROMTOOL_TESTS = sorted((ALERTS_DIR / "tests").glob("*.yaml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ALERTMANAGER = ALERTS_DIR / "alertmanager.yml"

# The alert names of design.md §4: the contract users' routes and silences rely on.
DESIGN_ALERTS = (
    "GpuIdleAllocated", "GpuUnused", "GpuMemoryBandwidthBound", "GpuMemoryNearlyFull", "GpuXidError",
    "GpuEccUncorrectable", "GpuThermalThrottling", "GpuLost", "GpuAgentDown", "GpuCollectorFailing",
    "GpuPhaseSpansMissing",
)
SEVERITIES = {"page", "warning", "info"}


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _promtool_cases() -> tuple[set[str], set[str]]:
    """Alert names with a case expecting them to fire, and with a case expecting silence."""
    firing, silent = set(), set()
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    return firing, silent


def _markdown_anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


# --- the generated file ---------------------------------------------------------------------------

def test_committed_rules_file_is_up_to_date():
    assert RULES_FILE.read_text() == rules.render(), "run: python -m gpuphase.alerts.rules"
    assert rules.main(["--check"]) == 0


def test_check_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "rules.yaml"
    stale.write_text(rules.render(RuleConfig(idle_threshold=0.5)))
    assert rules.main(["--check", "-o", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_for_scale_shortens_alert_windows_but_not_rate_windows(tmp_path):
    out = tmp_path / "fast.yaml"
    assert rules.main(["--for-scale", "0.01", "--scrape-interval", "1s", "-o", str(out)]) == 0
    groups = yaml.safe_load(out.read_text())["groups"]
    by_name = {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}
    assert by_name["GpuIdleAllocated"]["for"] == "18s"
    assert "[4s]" in by_name["GpuIdleAllocated"]["expr"]  # 3 s scaled, 4 scrapes of 1 s at least
    assert by_name["GpuUnused"]["for"] == "216s"
    assert by_name["GpuLost"]["for"] == "1s"  # 0.6 s rounds up to the 1 s floor
    assert "instance_gpu:gpu_phase_state:max_rate1m" in by_name


@pytest.mark.parametrize("scrape_interval, expected", [(1, 4), (5, 20), (15, 60)])
def test_scaled_ranges_keep_four_scrapes_of_the_scrape_interval(scrape_interval, expected):
    """At 0.01 the 5 m ranges would be 3 s: empty under a 5 s scrape, so GpuMemoryBandwidthBound
    could never fire in scripts/demo-stack.sh. Ranges keep 4 scrapes; `for:` windows still scale."""
    config = RuleConfig().scaled(0.01, scrape_interval)
    for name, scaled_alone in (("activity_window", 3), ("bandwidth_window", 3), ("xid_window", 3),
                               ("thermal_window", 6)):
        assert getattr(config, name) == max(expected, scaled_alone), name
    assert config.bandwidth_for == 9 and config.idle_for == 18
    rendered = rules.render(config)
    bandwidth = next(r for g in yaml.safe_load(rendered)["groups"] for r in g["rules"]
                     if r.get("alert") == "GpuMemoryBandwidthBound")
    assert f"[{format_duration(expected)}]" in bandwidth["expr"]
    assert RuleConfig().scaled(1.0, 15) == RuleConfig()  # unscaled rules are untouched


def test_set_overrides_fields_by_type():
    config = RuleConfig().with_overrides(
        ["idle_for=1h30m", "idle_threshold=0.1", "application_xids=13, 43", 'agent_selector=job="gpu"'])
    assert (config.idle_for, config.idle_threshold) == (5400, 0.1)
    assert config.application_xids == ("13", "43")
    assert config.agent_selector == 'job="gpu"'
    assert 'up{job="gpu"} == 0' in rules.render(config)
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        RuleConfig().with_overrides(["no_such_field=1"])
    with pytest.raises(ValueError, match="not a duration"):
        RuleConfig().with_overrides(["idle_for=30 minutes"])


@pytest.mark.parametrize("seconds, text", [(30, "30s"), (90, "90s"), (300, "5m"), (5400, "90m"), (21600, "6h"),
                                           (86400, "1d")])
def test_durations_round_trip(seconds, text):
    assert format_duration(seconds) == text
    assert rules.window_seconds(text) == seconds


# --- every alert is complete ----------------------------------------------------------------------

def test_every_design_alert_exists_and_nothing_else():
    assert sorted(_alert_rules()) == sorted(DESIGN_ALERTS)
    assert sorted(rules.alert_names()) == sorted(DESIGN_ALERTS)


@pytest.mark.parametrize("name", DESIGN_ALERTS)
def test_alert_has_severity_annotations_and_runbook(name):
    rule = _alert_rules()[name]
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert "{{ $labels.instance }}" in annotations["description"]
    if name != "GpuAgentDown" and name != "GpuCollectorFailing":  # those are about the agent, not a GPU
        assert "{{ $labels.gpu }}" in annotations["description"]
    anchor = name.lower()
    assert annotations["runbook_url"].endswith(f"docs/runbooks.md#{anchor}")
    assert anchor in _markdown_anchors(RUNBOOKS.read_text()), f"docs/runbooks.md has no section {name}"


@pytest.mark.parametrize("name", DESIGN_ALERTS)
def test_alert_has_promtool_cases_that_fire_and_stay_silent(name):
    firing, silent = _promtool_cases()
    assert name in firing, f"no promtool case in alerts/tests expects {name} to fire"
    assert name in silent, f"no promtool case in alerts/tests expects {name} to stay silent"


# --- the real promtool ----------------------------------------------------------------------------

def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    result = _promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = _promtool("test", "rules", *map(str, PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_catch_a_changed_rule(tmp_path):
    """Negative control: the same tests against rules with a 1-minute activity window must fail
    (a 1-minute average lets gpu 0 count as idle 4 minutes earlier), so they really pin the rules."""
    (tmp_path / "gpuphase-rules.yaml").write_text(rules.render(RuleConfig(activity_window=60)))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    shutil.copy(ALERTS_DIR / "tests" / "cost.yaml", tests_dir)
    result = _promtool("test", "rules", str(tests_dir / "cost.yaml"))
    assert result.returncode != 0
    assert "GpuIdleAllocated" in result.stdout + result.stderr


def test_scaled_rules_pass_promtool_check(tmp_path):
    out = tmp_path / "fast.yaml"
    out.write_text(rules.render(RuleConfig().scaled(0.01)))
    result = _promtool("check", "rules", str(out))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Alertmanager example -------------------------------------------------------------------------

def _amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("amtool"), *args], capture_output=True, text=True, timeout=60)


def test_alertmanager_example_is_valid():
    result = _amtool("check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("labels, receiver", [
    (["alertname=GpuLost", "severity=page", "instance=node1:9842", "gpu=0"], "pager"),
    (["alertname=GpuXidError", "severity=warning", "instance=node1:9842", "gpu=0"], "team-chat"),
    (["alertname=GpuIdleAllocated", "severity=info", "instance=node1:9842", "gpu=0"], "cost-digest"),
    (["alertname=SomethingElse", "instance=node1:9842"], "blackhole"),
])
def test_alertmanager_routes_by_severity(labels, receiver):
    result = _amtool("config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_every_alert_severity_has_a_route():
    config = yaml.safe_load(ALERTMANAGER.read_text())
    routed = {m for route in config["route"]["routes"] for m in route["matchers"]}
    for rule in _alert_rules().values():
        assert f'severity="{rule["labels"]["severity"]}"' in routed


def test_lost_gpu_inhibits_its_warnings():
    (inhibit,) = yaml.safe_load(ALERTMANAGER.read_text())["inhibit_rules"]
    assert inhibit["source_matchers"] == ['alertname="GpuLost"']
    assert set(inhibit["equal"]) == {"instance", "gpu"}
