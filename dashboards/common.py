"""What the gpuphase dashboards share: label selectors, template variables, thresholds from the alert rules."""

from __future__ import annotations

from gpuphase.alerts.rules import RuleConfig
from gpuphase.dashboards import grafana

# Panels filter with these; Grafana substitutes the variables (".*" when "All" is selected).
HOST = 'instance=~"$instance"'
GPU = 'instance=~"$instance", gpu=~"$gpu"'

# Thresholds drawn on panels are the alert rules' own, so a graph's red line is where the alert fires.
RULES = RuleConfig()


def sel(metric: str, matchers: str = GPU, extra: str = "") -> str:
    """metric{matchers, extra}: a selector with the dashboard's template filters."""
    inner = ", ".join(part for part in (matchers, extra) if part)
    return f"{metric}{{{inner}}}"


def instance_variable() -> dict:
    return grafana.query_variable("instance", "Host", "label_values(gpu_info, instance)")


def gpu_variable() -> dict:
    return grafana.query_variable("gpu", "GPU", 'label_values(gpu_info{instance=~"$instance"}, gpu)')


def application_xids() -> str:
    return "|".join(RULES.application_xids)


def matcher(label: str, op: str, value: str) -> str:
    """label op "value", e.g. matcher("phase", "=", "decode") -> phase="decode"."""
    return f'{label}{op}"{value}"'
