"""gpuphase.agent: the daemon. Backends read the GPUs, the sampler ticks, spans/ receives the
model servers' OTLP traces, phases/ turns both into phase totals; app.py wires them together."""
