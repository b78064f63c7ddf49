"""gpuphase's performance harness: `python -m benchmarks [--quick]` writes docs/performance.md.

Every figure is measured next to a baseline taken in the same run on the same machine, and is
reported as a ratio to it, so a slow or noisy machine shows up in both numbers instead of
passing for a regression. Each benchmark module exposes one function returning a `Section`
(benchmarks/results.py); `benchmarks/__main__.py` runs them in order and renders the report.
Nothing here asserts a duration: goals are reported as met or missed, with the reason.
"""
