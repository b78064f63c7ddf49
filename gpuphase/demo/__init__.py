"""`gpuphase demo`: the agent on simulated GPUs with a synthetic LLM-serving workload."""
