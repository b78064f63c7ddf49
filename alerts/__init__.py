"""Prometheus alerting and recording rules for gpuphase, generated from alerts/rules.py."""
