"""Grafana dashboards: committed JSON up to date and well-formed, every query parsed by a real
Prometheus (empty TSDB on loopback), every metric it names declared in gpuphase/model/metrics.yaml or
recorded by alerts/gpuphase-rules.yaml, units, variables and datasources set everywhere, and every key
and value checked against Grafana's own schema (grafana-foundation-sdk's generated models).

Grafana itself cannot run here; the end-to-end test runs all_queries() against a Prometheus
scraping the demo agent and requires data."""

from __future__ import annotations

import copy
import enum
import inspect
import json
import re
import socket
import subprocess
import time
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gpuphase.alerts import rules
from gpuphase.dashboards import build
from gpuphase.model import metricdefs
from tests.conftest import IN_CI, require_tool

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


# --- Grafana's own schema: grafana-foundation-sdk -------------------------------------------------
# The SDK (pinned in pyproject's test extra to the Grafana 11.6 line) is generated by Grafana's cog
# from the same schemas Grafana's dashboard kind and panel plugins declare. Its from_json() neither
# checks types nor complains about unknown keys (it reads the keys it knows and drops the rest), so
# the check below walks each committed JSON next to the SDK's models: every key must be a field of
# the model (the keys its from_json reads or its to_json writes), every value the field's annotated
# type (enums by value, Literal, Optional/Union, nested models recursively); panel options and
# fieldConfig.defaults.custom go to the model of the panel's plugin (timeseries/stat/table) and
# targets to the model of the datasource's plugin (prometheus), as the SDK's own decoder dispatches.
# A second check decodes through the SDK and encodes back: nothing may be lost on the way.

# Fields Grafana keeps although the SDK's v1 dashboard model does not list them (its schema is
# open): `definition` is the query text Grafana's variable editor shows and writes on export; the
# SDK's own v2 model (dashboardv2beta1.QueryVariableSpec) has it.
SDK_FIELDS_GRAFANA_KEEPS = {"VariableModel": {"definition"}}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def grafana_sdk():
    try:
        from grafana_foundation_sdk.cog import plugins
    except ImportError:
        message = "grafana-foundation-sdk is not installed (scripts/setup.sh installs the test extra)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    plugins.register_default_plugins()  # the panel and datasource plugin models, as Grafana's own decoder uses
    return SdkSchema()


class SdkSchema:
    """Checks a dashboard's JSON against grafana-foundation-sdk's models; errors as 'path: why'."""

    def __init__(self):
        from grafana_foundation_sdk.cog import runtime, variants
        from grafana_foundation_sdk.models import dashboard

        self.runtime = runtime.Runtime()
        self.dataquery = variants.Dataquery
        self.models = dashboard
        self._fields: dict[type, dict[str, object]] = {}

    # decode through the SDK and back ------------------------------------------------------------

    def lost_in_round_trip(self, data: dict) -> list[str]:
        """Paths the SDK's Dashboard.from_json -> to_json drops or changes."""
        from grafana_foundation_sdk.cog.encoder import JSONEncoder

        try:
            back = json.loads(json.dumps(self.models.Dashboard.from_json(data), cls=JSONEncoder))
        except Exception as error:  # noqa: BLE001 - a shape the SDK cannot decode at all
            return [f"$: the SDK cannot decode it: {type(error).__name__}: {error}"]
        lost: list[str] = []
        self._compare(data, back, "$", lost)
        return lost

    def _compare(self, original, back, path: str, lost: list[str]) -> None:
        if isinstance(original, dict) and isinstance(back, dict):
            variable = re.fullmatch(r"\$\.templating\.list\[\d+\]", path)
            keeps = SDK_FIELDS_GRAFANA_KEEPS["VariableModel"] if variable else set()
            for key, value in original.items():
                if key not in back:
                    if key not in keeps:
                        lost.append(f"{path}.{key}: dropped by the SDK")
                else:
                    self._compare(value, back[key], f"{path}.{key}", lost)
        elif isinstance(original, list) and isinstance(back, list) and len(original) == len(back):
            for i, (a, b) in enumerate(zip(original, back)):
                self._compare(a, b, f"{path}[{i}]", lost)
        elif original != back or type(original) is not type(back):
            lost.append(f"{path}: {original!r} came back as {back!r}")

    # keys and types ---------------------------------------------------------------------------

    def errors(self, data: dict) -> list[str]:
        errors: list[str] = []
        self._model(data, self.models.Dashboard, "$", errors, {})
        return errors

    def fields(self, cls: type) -> dict[str, object]:
        """JSON key -> annotated type, read off the generated from_json/to_json (cog writes one
        `if "key" in data: args["attr"] = ...` and one `payload["key"] = self.attr` per field)."""
        if cls not in self._fields:
            read = inspect.getsource(cls.from_json)
            write = inspect.getsource(cls.to_json)
            attr = dict(re.findall(r'"([^"]+)": self\.(\w+)', write))
            attr.update(re.findall(r'payload\["([^"]+)"\] = self\.(\w+)', write))
            attr.update(re.findall(r'if "([^"]+)" in data:\s*args\["(\w+)"\]', read))
            keys = set(re.findall(r'if "([^"]+)" in data:', read)) | set(attr)
            hints = typing.get_type_hints(cls)
            assert keys and keys <= set(attr), f"cannot read the fields of {cls.__qualname__}: {keys - set(attr)}"
            self._fields[cls] = {key: hints[attr[key]] for key in keys}
        return self._fields[cls]

    def _model(self, data, cls: type, path: str, errors: list[str], ctx: dict) -> None:
        if not isinstance(data, dict):
            errors.append(f"{path}: expected an object ({cls.__name__}), got {data!r}")
            return
        known = self.fields(cls)
        if cls is self.models.DataSourceRef and data != DATASOURCE_REF:
            errors.append(f"{path}: datasource {data!r} is not the ${{datasource}} variable {DATASOURCE_REF}")
        for key, value in data.items():
            sub = f"{path}.{key}"
            if key not in known:
                if key not in SDK_FIELDS_GRAFANA_KEEPS.get(cls.__name__, ()):
                    errors.append(f"{sub}: not a field of {cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}")
                continue
            hint = known[key]
            if cls is self.models.Panel:
                kind = data.get("type", "")
                plugin = self.runtime.panelcfg_config(kind)
                if key == "type" and plugin is None:
                    errors.append(f"{sub}: the SDK knows no panel plugin {kind!r}")
                    continue
                if key == "options":
                    hint = plugin.options_from_json_hook.__self__ if plugin and plugin.options_from_json_hook else None
                    if hint is None:
                        errors.append(f"{sub}: no options model for panel type {kind!r}")
                        continue
                ctx = {**ctx, "panel_type": kind, "datasource_type": (data.get("datasource") or {}).get("type", "")}
            if cls is self.models.FieldConfig and key == "custom":
                plugin = self.runtime.panelcfg_config(ctx.get("panel_type", ""))
                if plugin is None or plugin.field_config_from_json_hook is None:
                    errors.append(f"{sub}: panel type {ctx.get('panel_type')!r} has no custom field config")
                    continue
                hint = plugin.field_config_from_json_hook.__self__
            if key == "datasource" and object in (hint, *typing.get_args(hint)):  # a target's: "unknown" in the schema
                hint = self.models.DataSourceRef
            self._value(value, hint, sub, errors, ctx)

    def _value(self, value, hint, path: str, errors: list[str], ctx: dict) -> None:
        origin = typing.get_origin(hint)
        if hint is object or hint is typing.Any:
            return
        if origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            if value is None and len(options) < len(typing.get_args(hint)):
                return
            # a union of models is told apart by "type", as the SDK's decoder does (panels: "row" or not)
            tagged = [a for a in options if isinstance(a, type) and typing.get_origin(
                typing.get_type_hints(a).get("type_val")) is typing.Literal]
            if tagged and isinstance(value, dict):
                match = [a for a in tagged
                         if value.get("type") in typing.get_args(typing.get_type_hints(a)["type_val"])]
                options = match or [a for a in options if a not in tagged]
            best: list[str] | None = None
            for option in options:
                found: list[str] = []
                self._value(value, option, path, found, ctx)
                if not found:
                    return
                if best is None or len(found) < len(best):
                    best = found
            errors.extend(best or [f"{path}: {value!r} fits none of {hint}"])
        elif origin is typing.Literal:
            if not any(value == a and type(value) is type(a) for a in typing.get_args(hint)):
                errors.append(f"{path}: {value!r} is not one of {typing.get_args(hint)}")
        elif origin is list:
            if not isinstance(value, list):
                errors.append(f"{path}: expected a list, got {value!r}")
                return
            for i, item in enumerate(value):
                self._value(item, typing.get_args(hint)[0], f"{path}[{i}]", errors, ctx)
        elif origin is dict:
            if not isinstance(value, dict):
                errors.append(f"{path}: expected an object, got {value!r}")
                return
            for key, item in value.items():
                self._value(item, typing.get_args(hint)[1], f"{path}.{key}", errors, ctx)
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            allowed = [m.value for m in hint]
            if isinstance(value, bool) or not any(value == a and type(value) is type(a) for a in allowed):
                errors.append(f"{path}: {value!r} is not one of {allowed}")
        elif hint is bool or hint is str:
            if type(value) is not hint:
                errors.append(f"{path}: expected {hint.__name__}, got {value!r}")
        elif hint is int or hint is float:
            number = (int,) if hint is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, number):
                errors.append(f"{path}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
        elif hint is self.dataquery:
            own = value.get("datasource") if isinstance(value, dict) else None
            kind = ctx.get("datasource_type") or (own.get("type", "") if isinstance(own, dict) else "")
            plugin = self.runtime.dataquery_variants.get(kind)
            if plugin is None:
                errors.append(f"{path}: the SDK knows no query model for datasource type {kind!r}")
                return
            self._model(value, plugin.from_json_hook.__self__, path, errors, ctx)
        elif isinstance(hint, type) and hasattr(hint, "from_json"):
            self._model(value, hint, path, errors, ctx)
        else:
            errors.append(f"{path}: the check does not know the type {hint!r}")


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_fits_grafanas_schema(grafana_sdk, name):
    errors = grafana_sdk.errors(_dashboards()[name])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_grafanas_sdk_round_trips_the_dashboard_without_loss(grafana_sdk, name):
    lost = grafana_sdk.lost_in_round_trip(_dashboards()[name])
    assert not lost, "\n".join(lost)


def _first(dashboard: dict, kind: str) -> dict:
    return next(p for p in dashboard["panels"] if p["type"] == kind)


# (what is broken, how, the path the error must name, whether the SDK's round trip drops it too)
BROKEN_COPIES = [
    ("misspelled panel key", lambda d: _first(d, "timeseries").__setitem__(
        "gridPoss", _first(d, "timeseries").pop("gridPos")), ".gridPoss: not a field of dashboard.Panel", True),
    ("string for a number", lambda d: _first(d, "stat")["gridPos"].__setitem__("w", "4"),
     ".gridPos.w: expected an integer, got '4'", False),
    ("misspelled top-level key", lambda d: d.__setitem__("refrsh", d.pop("refresh")),
     "$.refrsh: not a field of dashboard.Dashboard", True),
    ("misspelled field default", lambda d: _first(d, "timeseries")["fieldConfig"]["defaults"].__setitem__(
        "unti", "bytes"), ".fieldConfig.defaults.unti: not a field of dashboard.FieldConfig", True),
    ("misspelled plugin option", lambda d: _first(d, "timeseries")["options"]["legend"].__setitem__(
        "placment", "right"), ".options.legend.placment: not a field of common.VizLegendOptions", True),
    ("misspelled custom field config", lambda d: _first(d, "timeseries")["fieldConfig"]["defaults"]["custom"]
     .__setitem__("fillOpacty", 10), ".custom.fillOpacty: not a field of common.GraphFieldConfig", True),
    ("misspelled table option", lambda d: _first(d, "table")["options"].__setitem__("showHeaders", True),
     ".options.showHeaders: not a field of table.Options", True),
    ("misspelled query key", lambda d: _first(d, "stat")["targets"][0].__setitem__("exprr", "up"),
     ".targets[0].exprr: not a field of prometheus.Dataquery", True),
    ("value outside an enum", lambda d: _first(d, "stat")["options"].__setitem__("colorMode", "rainbow"),
     ".options.colorMode: 'rainbow' is not one of", False),
    ("number as a string in thresholds", lambda d: _first(d, "stat")["fieldConfig"]["defaults"]["thresholds"]
     ["steps"].append({"color": "red", "value": "90"}), ".thresholds.steps[1].value: expected a number", False),
    ("unknown panel type", lambda d: _first(d, "stat").__setitem__("type", "singlestat"),
     ".type: the SDK knows no panel plugin 'singlestat'", False),
    ("hard-coded datasource", lambda d: _first(d, "table")["targets"][0].__setitem__(
        "datasource", {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}),
     ".targets[0].datasource: datasource {'type': 'prometheus', 'uid': 'P1809F7CD0C75ACF3'} is not", False),
    ("variable's datasource by name", lambda d: d["templating"]["list"][1].__setitem__("datasource", "Prometheus"),
     "$.templating.list[1].datasource: expected an object (DataSourceRef)", False),
]


@pytest.mark.parametrize("what, break_it, expected, dropped", BROKEN_COPIES, ids=[b[0] for b in BROKEN_COPIES])
def test_grafana_schema_check_catches_a_broken_copy(grafana_sdk, what, break_it, expected, dropped):
    """Control: the checks above would catch each of these on a copy of the node dashboard (it has
    all three panel kinds), and the unbroken copy passes."""
    dashboard = copy.deepcopy(_dashboards()["gpuphase-node.json"])
    assert grafana_sdk.errors(dashboard) == [] and grafana_sdk.lost_in_round_trip(dashboard) == []
    break_it(dashboard)
    errors = grafana_sdk.errors(dashboard)
    assert any(expected in e for e in errors), f"{what}: {expected!r} not in\n" + "\n".join(errors)
    if dropped:
        key = re.search(r"\.(\w+): not a field", expected).group(1)
        assert any(f".{key}: dropped by the SDK" in e for e in grafana_sdk.lost_in_round_trip(dashboard))
