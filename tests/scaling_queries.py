"""The PromQL that the scaling examples (packaging/kubernetes/examples/scaling/) send to Prometheus,
read from their files and made ready to run: the KEDA trigger's query, the prometheus-adapter
rule's metricsQuery with its template filled in as the adapter fills it for the HPA, and the
spin-down CronJob's query. Plain file reads (no kubectl), so that an end-to-end test can run
them against a real Prometheus: `scaling_example_queries()` -> {example: PromQL}."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "packaging" / "kubernetes" / "examples" / "scaling"
SCALED_OBJECT = EXAMPLES / "keda" / "scaledobject.yaml"
ADAPTER_CONFIG = EXAMPLES / "hpa-prometheus-adapter" / "adapter-config.yaml"
HPA = EXAMPLES / "hpa-prometheus-adapter" / "hpa.yaml"
CRONJOB = EXAMPLES / "spin-down" / "cronjob.yaml"
SPIN_DOWN_SCRIPT = EXAMPLES / "spin-down" / "spin-down.sh"

_SERVICE_MATCHER = re.compile(r'service="([^"]*)"')
_TEMPLATE_FIELD = re.compile(r"<<\s*\.(\w+)\s*>>")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def keda_trigger() -> dict[str, Any]:
    (trigger,) = _load(SCALED_OBJECT)["spec"]["triggers"]
    return trigger


def adapter_rule() -> dict[str, Any]:
    (rule,) = _load(ADAPTER_CONFIG)["externalRules"]
    return rule


def hpa_external_metric() -> dict[str, Any]:
    (metric,) = _load(HPA)["spec"]["metrics"]
    return metric["external"]["metric"]


def cronjob_env() -> dict[str, str]:
    (container,) = _load(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def series_of(series_query: str) -> str:
    """The metric name a prometheus-adapter seriesQuery selects (`name{...}` or `{__name__="name",...}`)."""
    match = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", series_query) or \
        re.search(r'__name__="([a-zA-Z_:][a-zA-Z0-9_:]*)"', series_query)
    if not match:
        raise ValueError(f"no metric name in seriesQuery {series_query!r}")
    return match.group(1)


def adapter_query(rule: dict[str, Any], match_labels: dict[str, str], namespace: str = "") -> str:
    """The PromQL prometheus-adapter sends for an External metric request: its metricsQuery
    template (delimiters << >>) with .Series the discovered series name, .LabelMatchers the HPA's
    selector as `label="value"` joined by commas (the HPA's namespace too, unless the rule says
    `namespaced: false`), and .GroupBy empty, as the adapter leaves it for external metrics
    (pkg/naming/metrics_query.go, BuildExternal). Only equality selectors, as the examples use."""
    labels = dict(match_labels)
    if rule.get("resources", {}).get("namespaced", True) and namespace:
        labels["namespace"] = namespace
    fields = {
        "Series": series_of(rule["seriesQuery"]),
        "LabelMatchers": ",".join(f"{name}={json.dumps(value)}" for name, value in sorted(labels.items())),
        "GroupBy": "",
    }

    def fill(match: re.Match) -> str:
        if match.group(1) not in fields:
            raise ValueError(f"template field .{match.group(1)} is not filled in for external metrics")
        return fields[match.group(1)]

    return _TEMPLATE_FIELD.sub(fill, rule["metricsQuery"])


def with_service(query: str, service: str) -> str:
    """The query with its one `service="..."` matcher set to `service`."""
    if len(_SERVICE_MATCHER.findall(query)) != 1:
        raise ValueError(f"expected exactly one service matcher in {query!r}")
    return _SERVICE_MATCHER.sub(f"service={json.dumps(service)}", query)


def scaling_example_queries(service: str = "chat-8b", rate_window: str = "5m") -> dict[str, str]:
    """Example name -> the PromQL it runs, ready for /api/v1/query. The per-service queries ask for
    `service` (the demo's services are llama-70b, chat-8b and reserved); the spin-down query
    covers every service. Names: "keda", "hpa-prometheus-adapter", "spin-down". `rate_window`:
    the rules' rate_window where a test generated them with another (the names end in it)."""
    queries = {
        "keda": with_service(keda_trigger()["metadata"]["query"], service),
        "hpa-prometheus-adapter": adapter_query(adapter_rule(), {**hpa_external_metric()["selector"]["matchLabels"],
                                                                 "service": service}),
        "spin-down": cronjob_env()["QUERY"],
    }
    return {name: query.replace(":rate5m", f":rate{rate_window}") for name, query in queries.items()}
