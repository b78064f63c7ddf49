"""Grafana dashboards: committed JSON up to date and well-formed, every query parsed by a real
Prometheus (empty TSDB on loopback), every metric it names declared in gpuphase/model/metrics.yaml or
recorded by alerts/gpuphase-rules.yaml, and units, variables and datasources set everywhere.

Grafana itself cannot run here; the end-to-end test runs all_queries() against a Prometheus
scraping the demo agent and requires data."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gpuphase.alerts import rules
from gpuphase.dashboards import build
from gpuphase.model import metricdefs
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = sorted(build.DASHBOARDS)

# PromQL words that are not metric names (functions, aggregations, operators and modifiers).
PROMQL_WORDS = {
    "sum", "count", "avg", "max", "min", "topk", "group", "rate", "increase", "avg_over_time", "max_over_time",
    "time", "vector", "scalar", "label_replace", "sort_desc", "and", "or", "unless", "by", "without", "on",
    "ignoring", "group_left", "group_right", "bool", "offset",
}
# Metrics that live in Prometheus rather than in the agent.
PROMETHEUS_METRICS = {"up"}
DEVICE_COLLECTORS = {"device", "gpm", "memory", "power", "interconnect", "errors", "processes", "mig"}


def _dashboards() -> dict[str, dict]:
    return {name: json.loads((ROOT / "dashboards" / name).read_text()) for name in DASHBOARD_FILES}


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that are metric names: strings, label matchers, grouping
    label lists and durations removed, PromQL's own words dropped."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    words = set(re.findall(r"(?<![\w:.])[A-Za-z_:][\w:]*", text))
    return words - PROMQL_WORDS


# --- files ----------------------------------------------------------------------------------------

def test_committed_json_is_up_to_date():
    assert build.main(["--check"]) == 0, "run: python -m gpuphase.dashboards.build"


def test_check_reports_a_stale_file(tmp_path, capsys):
    build.main(["-o", str(tmp_path)])
    (tmp_path / DASHBOARD_FILES[0]).write_text("{}\n")
    assert build.main(["--check", "-o", str(tmp_path)]) == 1
    assert DASHBOARD_FILES[0] in capsys.readouterr().err


def test_the_three_dashboards_exist_with_unique_uids():
    titles = {d["title"] for d in _dashboards().values()}
    assert titles == {"gpuphase / Fleet overview", "gpuphase / Node and GPU detail", "gpuphase / Serving phases"}
    uids = [d["uid"] for d in _dashboards().values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_panel_ids_unique_and_grid_inside_24_columns(name):
    dashboard = _dashboards()[name]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_datasource_is_the_variable_everywhere(name):
    dashboard = _dashboards()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "instance" in variables
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_detail_dashboards_have_a_gpu_variable_and_fleet_a_price():
    dashboards = _dashboards()
    for name in ("gpuphase-node.json", "gpuphase-phases.json"):
        assert "gpu" in {v["name"] for v in dashboards[name]["templating"]["list"]}
    price = {v["name"]: v for v in dashboards["gpuphase-fleet.json"]["templating"]["list"]}["gpu_hour_price"]
    assert float(price["query"]) > 0


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_panel_has_a_unit_and_thresholds(name):
    for panel in _panels(_dashboards()[name]):
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"], f"{panel['title']} has no unit"
        assert defaults["thresholds"]["steps"], f"{panel['title']} has no thresholds"


def test_units_used_are_the_expected_base_units():
    units = {p["fieldConfig"]["defaults"]["unit"] for d in _dashboards().values() for p in _panels(d)}
    assert {"percentunit", "bytes", "watt", "joule", "hertz", "celsius", "s"} <= units


# --- queries --------------------------------------------------------------------------------------

def test_no_query_hard_codes_a_job():
    for _, panel, expr in build.all_queries():
        assert "job=" not in expr and "job!" not in expr, panel


def test_per_host_queries_follow_the_instance_variable():
    for dashboard, panel, expr in build.all_queries(instance_regex="INSTANCE"):
        fleet_wide = all(name.startswith("phase:") for name in _metric_names(expr))
        assert fleet_wide or "INSTANCE" in expr, f"{dashboard} / {panel}: {expr}"


def test_every_metric_named_is_exported_or_recorded():
    known = set(metricdefs.load()) | set(rules.recorded_names()) | PROMETHEUS_METRICS
    for dashboard, panel, expr in build.all_queries():
        unknown = _metric_names(expr) - known
        assert not unknown, f"{dashboard} / {panel} names unknown metrics {unknown}: {expr}"


def test_metric_name_extraction_sees_through_matchers_and_grouping():
    expr = 'sum by (phase) (rate(gpu_phase_seconds_total{phase="decode", gpu=~"0|1"}[5m])) / ignoring (phase) group_left x:y:z'
    assert _metric_names(expr) == {"gpu_phase_seconds_total", "x:y:z"}


def test_node_dashboard_shows_every_device_metric_family():
    node_exprs = " ".join(e for d, _, e in build.all_queries() if d == "gpuphase / Node and GPU detail")
    device = [d.name for d in metricdefs.load().values() if d.collector in DEVICE_COLLECTORS]
    missing = [name for name in device if not re.search(rf"\b{name}\b", node_exprs)]
    assert not missing


def test_all_queries_substitutes_every_variable():
    for _, _, expr in build.all_queries(instance_regex="node1:9842", gpu_regex="0|1"):
        assert "$" not in expr
    assert len(build.all_queries(include_sparse=False)) < len(build.all_queries())


def test_substitute_refuses_unknown_variables():
    with pytest.raises(KeyError, match=r"\$nope"):
        build.substitute("up{x=~\"$nope\"}", {})


# --- a real Prometheus parses every query ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus with an empty TSDB and gpuphase's rules loaded, on a free loopback port."""
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(f"global: {{evaluation_interval: 1m}}\nrule_files: [{ROOT / 'alerts' / 'gpuphase-rules.yaml'}]\n")
    port = _free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=log, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited: {(workdir / 'prometheus.log').read_text()}")
            if _ready(f"{base}/-/ready"):
                break
            if time.monotonic() > deadline:
                pytest.fail("prometheus did not become ready within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_prometheus_loaded_the_rules(prometheus):
    status, body = _get(f"{prometheus}/api/v1/rules")
    assert status == 200
    loaded = {r["name"] for g in body["data"]["groups"] for r in g["rules"]}
    assert set(rules.alert_names()) <= loaded and set(rules.recorded_names()) <= loaded


def test_prometheus_parses_every_dashboard_query(prometheus):
    failures = []
    for dashboard, panel, expr in build.all_queries(instance_regex="node1:9842|node2:9842", gpu_regex="0|1"):
        status, body = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200 or body.get("status") != "success":
            failures.append(f"{dashboard} / {panel}: {body.get('error')}\n{expr}")
    assert not failures, "\n\n".join(failures)


def test_prometheus_rejects_a_broken_query(prometheus):
    """Control: the parse check above would catch a syntax error."""
    status, body = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": "sum(rate(x[5m])"}))
    assert status == 400 and body["errorType"] == "bad_data"


def test_template_variable_queries_parse(prometheus):
    for dashboard in _dashboards().values():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            selector = build.substitute(match.group(1), {"instance": ".*", "gpu": ".*"})
            status, body = _get(f"{prometheus}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector}))
            assert status == 200, body
