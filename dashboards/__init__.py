"""Grafana dashboards as code; `python -m gpuphase.dashboards.build` writes the JSON users import."""
