"""gpuphase.model: the data every layer shares and nothing else.

Snapshots and the scrape View, the phase vocabulary and PhaseWindow, the metric definitions of
metrics.yaml, durations and addresses. It imports nothing of gpuphase, so anything may import it.
"""
