"""The scaling examples (packaging/kubernetes/examples/scaling/, docs/scaling.md) checked with the real
tools: each renders with kubectl kustomize and its built-in kinds validate with kubernetes-validate;
the KEDA ScaledObject (a CRD, no schema offline) is checked field by field; every PromQL query
the examples send parses with promtool, names only recording rules alert/gpuphase-rules.yaml
records, and computes the expected scaling decisions in a promtool unit test against those rules;
the spin-down script runs for real (POSIX sh, curl) against a fake Prometheus and a fake kubectl.

In CI (CI=true) a missing tool is a failure, not a skip (conftest.require_tool)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests import scaling_queries as sq
from tests.conftest import require_tool
from tests.test_packaging import RULES_FILE, _by_kind, _kustomize, _require_rules_file, _run, _validate_builtin

ROOT = Path(__file__).resolve().parent.parent
METRICS_YAML = ROOT / "gpuphase" / "model" / "metrics.yaml"
SCALING_DOC = ROOT / "docs" / "scaling.md"
NAMESPACE = "inference"
EXPECTED_KINDS = {
    "keda": {"ScaledObject"},
    "hpa-prometheus-adapter": {"ConfigMap", "HorizontalPodAutoscaler"},
    "spin-down": {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"},
}
CRD_KINDS = {"ScaledObject"}  # KEDA's: no schema in kubernetes-validate
# prometheus-adapter's DiscoveryRule (pkg/config/config.go): an unknown key is silently ignored there.
ADAPTER_RULE_KEYS = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    """example -> kind -> the one rendered object of that kind."""
    return {example: _by_kind(_kustomize(sq.EXAMPLES / example)) for example in EXPECTED_KINDS}


def _pod_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# --- rendering and validation -----------------------------------------------------------------------

@pytest.mark.parametrize("example", sorted(EXPECTED_KINDS))
def test_example_renders_and_validates(rendered, example):
    kinds = rendered[example]
    assert set(kinds) == EXPECTED_KINDS[example]
    _validate_builtin([doc for kind, doc in kinds.items() if kind not in CRD_KINDS])
    for kind, doc in kinds.items():
        adapter_config = (example, kind) == ("hpa-prometheus-adapter", "ConfigMap")  # lives with the adapter
        assert doc["metadata"]["namespace"] == ("monitoring" if adapter_config else NAMESPACE), doc["metadata"]


def test_rendered_examples_carry_what_scaling_queries_reads(rendered):
    """scaling_queries reads the source files; kustomize must apply exactly those."""
    trigger = rendered["keda"]["ScaledObject"]["spec"]["triggers"][0]
    assert trigger == sq.keda_trigger()
    adapter = rendered["hpa-prometheus-adapter"]
    assert yaml.safe_load(adapter["ConfigMap"]["data"]["config.yaml"]) == yaml.safe_load(sq.ADAPTER_CONFIG.read_text())
    assert adapter["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["external"]["metric"] == sq.hpa_external_metric()
    spin_down = rendered["spin-down"]
    (container,) = _pod_spec(spin_down["CronJob"])["containers"]
    assert {e["name"]: e["value"] for e in container["env"] if "value" in e} == sq.cronjob_env()
    assert spin_down["ConfigMap"]["data"] == {"spin-down.sh": sq.SPIN_DOWN_SCRIPT.read_text()}


def test_keda_scaled_object(rendered):
    scaled = rendered["keda"]["ScaledObject"]
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    # The signal sees only work on GPUs the service holds: from zero replicas nothing scales it up.
    assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] >= spec["minReplicaCount"]
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                         "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"  # replicas = ceil(metric / threshold)
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), metadata  # map[string]string in the CRD
    assert {"serverAddress", "query", "threshold"} <= set(metadata)
    assert re.fullmatch(r"https?://[a-z0-9.-]+\.svc(\.cluster\.local)?:\d+", metadata["serverAddress"])
    assert float(metadata["threshold"]) >= 1  # GPUs per replica
    assert metadata["ignoreNullValues"] == "false"  # no answer must not read as 0 desired GPUs
    assert re.findall(r'service="([^"]*)"', metadata["query"]) == [target["name"]]
    assert sq.series_of(sq.adapter_rule()["seriesQuery"]) in metadata["query"]


def test_adapter_rule_serves_the_metric_the_hpa_asks_for(rendered):
    config = yaml.safe_load(rendered["hpa-prometheus-adapter"]["ConfigMap"]["data"]["config.yaml"])
    assert set(config) == {"externalRules"}
    (rule,) = config["externalRules"]
    assert set(rule) <= ADAPTER_RULE_KEYS, set(rule) - ADAPTER_RULE_KEYS
    series = sq.series_of(rule["seriesQuery"])
    assert re.search(rule["name"]["matches"], series)
    assert rule["resources"]["namespaced"] is False  # the series has no namespace label
    hpa = rendered["hpa-prometheus-adapter"]["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    assert metric["external"]["target"]["type"] == "AverageValue"  # replicas = ceil(metric / averageValue)
    assert float(metric["external"]["target"]["averageValue"]) >= 1
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"service": hpa["spec"]["scaleTargetRef"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 1
    query = sq.adapter_query(rule, metric["external"]["metric"]["selector"]["matchLabels"], NAMESPACE)
    assert query == f'max by (service) ({series}{{service="{hpa["spec"]["scaleTargetRef"]["name"]}"}})'


def test_adapter_template_is_filled_in_as_the_adapter_does():
    rule = {"seriesQuery": '{__name__="some:series",service!=""}',
            "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"}
    assert sq.adapter_query(rule, {"service": "a", "b": 'x"y'}, "ns") == \
        'sum(some:series{b="x\\"y",namespace="ns",service="a"}) by ()'
    with pytest.raises(ValueError, match="LabelValuesByName"):
        sq.adapter_query({**rule, "metricsQuery": "<<.LabelValuesByName>>"}, {}, "ns")


def test_spin_down_job_is_a_dry_run_locked_down_to_scaling_in_its_namespace(rendered):
    kinds = rendered["spin-down"]
    cronjob, role, binding, account = kinds["CronJob"], kinds["Role"], kinds["RoleBinding"], kinds["ServiceAccount"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod_spec(cronjob)
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DRY_RUN"]["value"] == "true"
    assert env["NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert int(env["IDLE_SECONDS"]["value"]) >= 600
    assert container["command"] == ["/bin/sh", "/scripts/spin-down.sh"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/scripts")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]  # the generated, hashed name
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    # kubectl scale GETs the Deployment, then PATCHes its scale subresource: that and nothing more.
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
    ]
    account_name = account["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account_name, "namespace": NAMESPACE}]
    assert pod["serviceAccountName"] == account_name


# --- the PromQL ---------------------------------------------------------------------------------------

def _recorded_names() -> set[str]:
    _require_rules_file()
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _metric_names() -> set[str]:
    return {metric["name"] for metric in yaml.safe_load(METRICS_YAML.read_text())["metrics"]}


def _unknown_names(query: str, recorded: set[str], metrics: set[str]) -> tuple[set[str], set[str]]:
    """(names of recording rules used, names used that neither a rule records nor the agent exports).
    Names are identifiers outside string literals: level:metric:operations for rules, gpu_* for metrics."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', query)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", code))
    rules = {name for name in names if ":" in name}
    return rules, (rules - recorded) | ({name for name in names if name.startswith("gpu_")} - metrics)


def _doc_queries() -> dict[str, str]:
    """The ```promql blocks of docs/scaling.md, so that the documented queries cannot rot either."""
    blocks = re.findall(r"^```promql\n(.*?)^```", SCALING_DOC.read_text(), flags=re.M | re.S)
    return {f"docs-{n}": block.strip() for n, block in enumerate(blocks, 1)}


def _all_queries() -> dict[str, str]:
    return {**sq.scaling_example_queries(), **_doc_queries()}


@pytest.mark.parametrize("name", sorted(_all_queries()))
def test_query_names_only_recorded_rules_and_exported_metrics(name):
    used, unknown = _unknown_names(_all_queries()[name], _recorded_names(), _metric_names())
    assert used, "a scaling query reads the gpuphase.scaling recording rules"
    assert not unknown, f"{name}: {sorted(unknown)} are not in {RULES_FILE.name} / metrics.yaml (renamed?)"


def test_name_check_catches_a_renamed_rule():
    query = sq.scaling_example_queries()["keda"].replace("service_desired_gpus", "service_wanted_gpus")
    assert _unknown_names(query, _recorded_names(), _metric_names())[1] == {"gpuphase:service_wanted_gpus:rate5m"}


def test_queries_parse_with_promtool(tmp_path):
    rules = [{"record": f"scaling_example:{re.sub(r'[^a-z0-9]', '_', name)}", "expr": query}
             for name, query in sorted(_all_queries().items())]
    assert len(rules) >= 4  # the three examples and at least one documented query
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "scaling-examples", "rules": rules}]}))
    _run(require_tool("promtool"), "check", "rules", path)


def _selector(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{name}="{value}"' for name, value in labels.items()) + "}"


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    return {"series": name + _selector(labels), "values": values}


def _gpu(gpu: int) -> dict[str, str]:
    return {"instance": "node1:9842", "job": "gpuphase", "gpu": str(gpu), "uuid": f"GPU-{gpu}"}


def _phase_series(gpu: int, service: str, per_minute: dict[str, int]) -> list[dict[str, str]]:
    """A mapped GPU exports every phase, zeros included (agent/phases/ledger.py)."""
    return [_series("gpu_phase_seconds_total", {**_gpu(gpu), "phase": phase, "service": service},
                    f"0+{per_minute.get(phase, 0)}x90") for phase in ("prefill", "decode", "mixed", "idle")]


def test_queries_compute_the_scaling_decisions(tmp_path):
    """The demo's layout against the real rules: llama-70b on GPUs 0-1 busy 75% (1.5 GPUs of work:
    3 desired at 70%), chat-8b on GPU 2 busy 90% (2 desired), reserved on GPU 3 never busy; GPU 2
    also still carries a stale service `old`, which must not break the spin-down join."""
    _require_rules_file()
    inputs = [_series("gpu_up", _gpu(gpu), "1x90") for gpu in range(4)]
    inputs += _phase_series(0, "llama-70b", {"prefill": 15, "decode": 30, "idle": 15})
    inputs += _phase_series(1, "llama-70b", {"prefill": 15, "decode": 30, "idle": 15})
    inputs += _phase_series(2, "chat-8b", {"decode": 54, "idle": 6})
    inputs += _phase_series(3, "reserved", {"idle": 60})
    inputs.append(_series("gpu_phase_seconds_total", {**_gpu(2), "phase": "idle", "service": "old"}, "100x90"))
    cases = []
    for service, desired in (("llama-70b", 3), ("chat-8b", 2), ("reserved", 0)):
        queries = sq.scaling_example_queries(service)
        cases.append({"expr": queries["keda"], "eval_time": "80m", "exp_samples": [{"labels": "{}", "value": desired}]})
        cases.append({"expr": queries["hpa-prometheus-adapter"], "eval_time": "80m",
                      "exp_samples": [{"labels": f'{{service="{service}"}}', "value": desired}]})
    # Idle past an hour: only reserved's GPU (idle since its rate window filled, ~76 minutes).
    idle = [("llama-70b", 0, 0), ("llama-70b", 1, 0), ("chat-8b", 2, 0), ("old", 2, 0), ("reserved", 3, 1)]
    cases.append({"expr": f"({sq.scaling_example_queries()['spin-down']}) > bool 3600", "eval_time": "80m",
                  "exp_samples": [{"labels": _selector({**_gpu(gpu), "service": service}), "value": value}
                                  for service, gpu, value in idle]})
    test_file = tmp_path / "scaling-examples.yaml"
    test_file.write_text(yaml.safe_dump({
        "rule_files": [str(RULES_FILE)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": cases}],
    }, sort_keys=False))
    _run(require_tool("promtool"), "test", "rules", test_file)


# --- the spin-down script, run for real -------------------------------------------------------------

def _sample(service: str, gpu: int, idle: str | float, **labels: str) -> dict:
    return {"metric": {"instance": "node1:9842", "job": "gpuphase", "gpu": str(gpu), "uuid": f"GPU-{gpu}",
                       "service": service, **labels}, "value": [1712345678.123, str(idle)]}


# llama-70b: both GPUs idle past an hour. chat-8b: one idle, one busy.
IDLE_AND_BUSY = [_sample("llama-70b", 0, 7200), _sample("llama-70b", 1, "7260.5"),
                 _sample("chat-8b", 2, 7200), _sample("chat-8b", 3, 12)]


class FakePrometheus:
    """/api/v1/query answering a canned vector (compact JSON, as Prometheus writes it); records queries."""

    def __init__(self, result: list[dict] | None = None, status: int = 200):
        self.queries: list[str] = []
        self.body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result or []}},
                               separators=(",", ":")).encode()
        self.status = status
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/api/v1/query":
                    self.send_error(404)
                    return
                fake.queries.extend(urllib.parse.parse_qs(url.query).get("query", []))
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


FAKE_KUBECTL = """#!/bin/sh
# Records each call, one line, arguments separated by tabs; fails for deployment/$FAIL_FOR.
for arg; do printf '%s\\t' "$arg"; done >> "$KUBECTL_CALLS"
printf '\\n' >> "$KUBECTL_CALLS"
case " $* " in *" deployment/${FAIL_FOR:-} "*) echo "Error from server (NotFound)" >&2; exit 1 ;; esac
echo "deployment.apps/scaled"
"""


def _spin_down(tmp_path: Path, prometheus: FakePrometheus, **env: str | None):
    """Run spin-down.sh as the CronJob does; returns (result, kubectl calls as argument lists)."""
    shell = require_tool("sh")
    require_tool("curl")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    calls = tmp_path / "kubectl-calls"
    run_env = {**sq.cronjob_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "KUBECTL_CALLS": str(calls), "PROMETHEUS_URL": prometheus.url, "NAMESPACE": NAMESPACE}
    for name, value in env.items():
        if value is None:
            run_env.pop(name, None)
        else:
            run_env[name] = value
    result = subprocess.run([shell, sq.SPIN_DOWN_SCRIPT], env=run_env, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [line.rstrip("\t").split("\t") for line in lines]


def _scale(service: str) -> list[str]:
    return ["scale", f"deployment/{service}", "--replicas=0", "-n", NAMESPACE]


@pytest.mark.parametrize("dry_run", ["true", None, "False", "no"])
def test_spin_down_dry_run_scales_nothing_and_says_what_it_would(tmp_path, dry_run):
    """The CronJob's default, an unset DRY_RUN and any value but "false" are all dry runs."""
    with FakePrometheus(IDLE_AND_BUSY) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN=dry_run)
    assert result.returncode == 0, result.stderr
    assert calls == []
    assert f"would run: kubectl scale deployment/llama-70b --replicas=0 -n {NAMESPACE}" in result.stdout
    assert "would run: kubectl scale deployment/chat-8b" not in result.stdout
    assert "keep chat-8b" in result.stdout


def test_spin_down_scales_each_idle_service_once_and_keeps_partly_busy_ones(tmp_path):
    with FakePrometheus(IDLE_AND_BUSY) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls == [_scale("llama-70b")]  # two idle GPUs, one call; chat-8b has a busy GPU
    assert prometheus.queries == [sq.cronjob_env()["QUERY"]]  # the query arrives intact (URL-encoded)


def test_spin_down_threshold_is_strict_and_configurable(tmp_path):
    with FakePrometheus(IDLE_AND_BUSY) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false", IDLE_SECONDS="7200")
    assert result.returncode == 0 and calls == []  # 7200 s is not more than 7200 s
    with FakePrometheus(IDLE_AND_BUSY) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false", IDLE_SECONDS="1h")
    assert result.returncode == 2 and "whole number" in result.stderr and calls == []


def test_spin_down_never_acts_on_labels_it_cannot_trust(tmp_path):
    """Service names come from spans. None that is not a Deployment name reaches kubectl, none is
    trimmed into another service's name, and other labels cannot pose as the service label."""
    result = [
        _sample("chat-8b", 2, 10),                             # busy: chat-8b stays
        _sample(" chat-8b", 5, 9000),                          # would trim to chat-8b
        _sample("chat-8b idle", 6, 9000),                      # would split into chat-8b + "idle"
        _sample("Bad_Name", 7, 9000), _sample("other", 8, 9000),
        _sample("ok", 9, 9000, uuid='x","service":"victim'),   # an escaped quote in another label
        _sample("nan-valued", 10, "NaN"), _sample("inf-valued", 11, "+Inf"),
    ]
    with FakePrometheus(result) as prometheus:
        run, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false")
    assert run.returncode == 0, run.stdout + run.stderr
    assert calls == [_scale("ok")]
    assert "skip 3 series whose service label is not a Deployment name" in run.stdout
    assert "skip other" in run.stdout and "keep nan-valued" in run.stdout and "keep inf-valued" in run.stdout


def test_spin_down_allow_and_exclude_lists(tmp_path):
    idle = [_sample(name, gpu, 9000) for gpu, name in enumerate(("a", "b", "c"))]
    with FakePrometheus(idle) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false", SERVICES="a b", EXCLUDE_SERVICES="b")
    assert result.returncode == 0 and calls == [_scale("a")]


def test_spin_down_goes_on_past_a_failed_scale_and_then_fails(tmp_path):
    idle = [_sample("a", 0, 9000), _sample("b", 1, 9000)]
    with FakePrometheus(idle) as prometheus:
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false", FAIL_FOR="a")
    assert calls == [_scale("a"), _scale("b")]
    assert result.returncode == 1 and "could not scale deployment/a" in result.stderr


@pytest.mark.parametrize("status", [503, 200])
def test_spin_down_scales_nothing_when_prometheus_fails(tmp_path, status):
    with FakePrometheus(IDLE_AND_BUSY, status=status) as prometheus:
        if status == 200:  # a 200 that is no success answer (a proxy's error page, say)
            prometheus.body = b'{"status":"error","errorType":"bad_data","error":"parse error"}'
        result, calls = _spin_down(tmp_path, prometheus, DRY_RUN="false")
    assert result.returncode != 0 and calls == []


def test_spin_down_script_is_strict_posix_sh():
    text = sq.SPIN_DOWN_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, flags=re.M)
    assert "jq" not in re.sub(r"#.*", "", text)  # not in every kubectl image
    for shell in dict.fromkeys(filter(None, (require_tool("sh"), shutil.which("dash")))):
        _run(shell, "-n", sq.SPIN_DOWN_SCRIPT)
