"""gpuphase: a per-node GPU observability agent that knows what the model server is doing."""

__version__ = "0.1.0"
