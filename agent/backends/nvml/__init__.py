"""The NVML backend: real GPUs through nvidia-ml-py (pynvml). The only package that imports pynvml.

- Capabilities are probed, not assumed. A call or metric that answers NotSupported,
  FunctionNotFound, NoPermission or ArgumentVersionMismatch on a GPU is recorded once and never
  asked again, and the series is left out (absent is not zero).
- GpuIsLost (and the GPU-level errors a reset produces) raise GpuLost for that GPU only;
  `recover()` re-acquires the handle by UUID and re-creates the GPM samples.
- The tick is hot: all scalar fields come from one nvmlDeviceGetFieldValues call (fields.py),
  the requests NVML fills in are allocated once per GPU, and the slow
  nvmlDeviceGetPcieThroughput (a 20 ms sampling window per call) and nvidia-smi are never used.
- XIDs arrive as events on their own thread (xid.py), not as a "last XID" value.

Calls for one GPU must not overlap (the sampler never queues a GPU whose reading is still
running); different GPUs may be read from different threads at the same time, which NVML allows.

    backend.py  NvmlBackend: discover, read, recover, close
    device.py   one GPU's reading per tick
    fields.py   the batched field values and the temperature request
    gpm.py      GPM samples and metrics
    mig.py      MIG GPU instances
    xid.py      the XID event thread
    common.py   error classes, plain ctypes structs, the direct NVML call
"""

from gpuphase.agent.backends.nvml.backend import SIM_HINT, NvmlBackend

__all__ = ["NvmlBackend", "SIM_HINT"]
