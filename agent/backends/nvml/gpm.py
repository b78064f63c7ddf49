"""GPU Performance Monitoring (Hopper and newer): SM, tensor, DRAM and FP activity per interval."""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import pynvml

from gpuphase.agent.backends.nvml.common import CAPABILITY_ERRORS, NVML_SUCCESS, answer_layout, plain_struct

log = logging.getLogger(__name__)

GPM_ANSWER = answer_layout(pynvml.c_nvmlGpmMetric_t, ("nvmlReturn", "I"), ("value", "d"))
PlainGpmMetric = plain_struct(pynvml.c_nvmlGpmMetric_t)
PlainGpmMetricsGet = plain_struct(pynvml.c_nvmlGpmMetricsGet_t)  # the sample pointers are set every tick

GPM_METRICS = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "gpu_sm_active_ratio"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "gpu_sm_occupancy_ratio"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu_tensor_active_ratio"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu_dram_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP16_UTIL, "gpu_fp16_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP32_UTIL, "gpu_fp32_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP64_UTIL, "gpu_fp64_active_ratio"),
)

# What nvmlGpmMigSampleGet supports for one GPU instance, as named in metrics.yaml.
MIG_GPM_METRICS = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "gpu_mig_sm_active_ratio"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu_mig_tensor_active_ratio"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu_mig_dram_active_ratio"),
)


GPM_MIN_INTERVAL = 0.1  # NVML: two GPM samples must be at least 100 ms apart


class GpmRequest:
    """The ~19 KB nvmlGpmMetricsGet request and the metrics it asks for, allocated once.

    One request can serve several sample pairs that are never evaluated at the same time: all MIG
    instances of one GPU share one (calls for one GPU never overlap). A metric the GPU answers
    NotSupported for is dropped from the request for good.
    """

    def __init__(self, metrics: tuple[tuple[int, str], ...]):
        self._request = PlainGpmMetricsGet(version=pynvml.NVML_GPM_METRICS_GET_VERSION)
        # The request's metrics, written through plain structs; a view, not a copy.
        self._slots = (PlainGpmMetric * pynvml.NVML_GPM_METRIC_MAX).from_buffer(
            self._request, PlainGpmMetricsGet.metrics.offset)
        self._metrics: tuple[tuple[int, str], ...] = ()
        self._set_metrics(metrics)

    def _set_metrics(self, metrics: tuple[tuple[int, str], ...]) -> None:
        self._metrics = metrics
        self._request.numMetrics = len(metrics)
        for slot, (metric_id, _name) in enumerate(metrics):
            self._slots[slot].metricId = metric_id
        # (status, value) of each metric asked for, flat (see answer_layout)
        self._unpack = struct.Struct("<" + GPM_ANSWER * len(metrics)).unpack_from

    def evaluate(self, previous: Any, current: Any) -> dict[str, float]:
        """The ratios over the interval between two samples."""
        self._request.sample1 = previous
        self._request.sample2 = current
        pynvml.nvmlGpmMetricsGet(self._request)
        values: dict[str, float] = {}
        dropped = []
        answers = self._unpack(self._request, PlainGpmMetricsGet.metrics.offset)
        for (metric_id, name), status, percent in zip(self._metrics, answers[0::2], answers[1::2]):
            if status == NVML_SUCCESS:
                ratio = percent / 100.0  # clamp_ratio, inlined: 7 metrics per GPU per tick
                values[name] = 0.0 if ratio < 0.0 else 1.0 if ratio > 1.0 else ratio
            elif status in CAPABILITY_ERRORS:
                dropped.append(metric_id)
        if dropped:
            log.info("GPM metrics %s are not supported; leaving them out", dropped)
            self._set_metrics(tuple(m for m in self._metrics if m[0] not in dropped))
        return values


class Gpm:
    """GPM sampling for one GPU, or for one MIG GPU instance of it (gpu_instance_id): two samples,
    allocated once and swapped every tick, and a metrics request (shared where given)."""

    def __init__(self, handle: Any, request: GpmRequest | None = None, gpu_instance_id: int | None = None):
        self._handle = handle
        self._gpu_instance_id = gpu_instance_id
        self._samples = [pynvml.nvmlGpmSampleAlloc()]
        try:
            self._samples.append(pynvml.nvmlGpmSampleAlloc())
        except pynvml.NVMLError:
            self.free()
            raise
        self._request = request if request is not None else GpmRequest(GPM_METRICS)
        self._previous_at: float | None = None  # monotonic time of the previous sample
        self._last: dict[str, float] = {}

    def _take(self, sample: Any) -> None:
        if self._gpu_instance_id is None:
            pynvml.nvmlGpmSampleGet(self._handle, sample)
        else:
            pynvml.nvmlGpmMigSampleGet(self._handle, self._gpu_instance_id, sample)

    def read(self) -> dict[str, float]:
        """GPM ratios over the interval since the previous call; {} on the first call.

        A call less than 100 ms after the previous one returns the previous figures rather than
        an NVML error or nothing (the sampler may tick faster under test or after an overrun).
        """
        now = time.monotonic()
        if self._previous_at is not None and now - self._previous_at < GPM_MIN_INTERVAL:
            return self._last
        previous, current = self._samples
        self._take(current)
        first = self._previous_at is None
        self._samples.reverse()
        self._previous_at = now
        if first:
            return {}
        values = self._request.evaluate(previous, current)
        self._last = values
        return values

    def free(self) -> None:
        """Release the samples; errors are ignored because this runs on lost GPUs and at shutdown."""
        for sample in self._samples:
            try:
                pynvml.nvmlGpmSampleFree(sample)
            except pynvml.NVMLError as err:
                log.debug("nvmlGpmSampleFree: %s", err)
        self._samples = []
