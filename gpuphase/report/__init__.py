"""`gpuphase report`: waste, right-sizing and cost from what Prometheus holds (docs/report.md)."""
