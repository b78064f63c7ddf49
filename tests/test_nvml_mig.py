"""MIG GPU instances in NvmlBackend, through the real pynvml ctypes layer against the fake libnvidia-ml.so.1.

The fake's `gpuN.mig=PROFILES` key turns MIG on for GPU N with one GPU instance per profile (ids
1..k, memory from the profile); see tests/fakenvml/fake_nvml.c.
"""

from __future__ import annotations

import pytest

from gpuphase.agent.backends import GpuLost
from gpuphase.agent.backends.nvml import NvmlBackend
from gpuphase.agent.backends.nvml.mig import mig_profile
from gpuphase.agent.sampler import Sampler
from gpuphase.exporters.registry import render
from gpuphase.model.view import View
from tests.fakenvml import FakeNvml
from tests.test_collectors import series, value
from tests.test_nvml_backend import EVENT_WAIT_MS, eventually, read_until

GIB = 1024**3
MIG_MEMORY = ("gpu_mig_memory_used_bytes", "gpu_mig_memory_total_bytes")
MIG_RATIOS = ("gpu_mig_sm_active_ratio", "gpu_mig_tensor_active_ratio", "gpu_mig_dram_active_ratio")
TWO_SLICES = {"gpus": 2, "gpu0.mig": "3g.40gb,3g.40gb"}  # GPU 0 split in two, GPU 1 whole


@pytest.fixture
def fake(fake_nvml_library, tmp_path):
    with FakeNvml(fake_nvml_library, tmp_path).activate() as fake:
        fake.control(TWO_SLICES)
        yield fake


@pytest.fixture
def backends():
    """Make NvmlBackends (with a chosen MIG refresh interval) and close them all afterwards."""
    made = []

    def make(**options):
        backend = NvmlBackend(event_wait_ms=EVENT_WAIT_MS, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(fake, backends):
    return backends()


def by_id(reading) -> dict:
    return {instance.gpu_instance_id: instance for instance in reading.mig}


def read_with_mig_gpm(backend, index=0):
    """GPM needs two samples >= 100 ms apart: poll until every instance has its ratios."""
    return read_until(backend, index, lambda r: r.mig and all(MIG_RATIOS[0] in i.values for i in r.mig))


def test_mig_instances_have_ids_profiles_memory_and_gpm_from_the_second_read(backend, fake):
    fake.control({"gpu0.mig": "3g.40gb,1g.10gb"})
    backend.discover()

    first = by_id(backend.read(0))
    assert {i: (m.profile, m.values["gpu_mig_memory_total_bytes"]) for i, m in first.items()} == {
        1: ("3g.40gb", 40 * GIB), 2: ("1g.10gb", 10 * GIB)}
    for instance in first.values():
        assert 0 < instance.values["gpu_mig_memory_used_bytes"] <= instance.values["gpu_mig_memory_total_bytes"]
        assert not set(MIG_RATIOS) & set(instance.values), "first tick has no previous GPM sample"

    later = by_id(read_with_mig_gpm(backend))
    assert set(later) == {1, 2}
    for instance in later.values():
        assert set(instance.values) == set(MIG_MEMORY) | set(MIG_RATIOS)
        for name in MIG_RATIOS:
            assert 0.0 <= instance.values[name] <= 1.0, name
    # Each slice is sampled on its own: the fake runs them out of phase, so they differ.
    assert later[1].values != later[2].values


def test_a_gpu_without_mig_next_to_it_has_no_mig_readings(backend):
    backend.discover()
    read_with_mig_gpm(backend, 0)

    whole = backend.read(1)
    assert whole.mig == ()
    assert whole.values["gpu_memory_total_bytes"] == 80 * GIB


def test_the_parent_gpu_is_still_reported_as_a_whole(backend):
    backend.discover()
    parent = read_until(backend, 0, lambda r: "gpu_sm_active_ratio" in r.values)

    assert parent.values["gpu_memory_total_bytes"] == 80 * GIB
    assert "gpu_utilization_ratio" in parent.values


def test_mig_series_render_with_instance_and_profile_labels(backend):
    sampler = Sampler(backend, interval=1.0, timeout=5.0)
    identities = sampler.start(run_loop=False)

    def snapshot_with_mig_gpm():
        snapshot = sampler.tick()
        instances = snapshot.gpu(0).mig
        return snapshot if instances and all(MIG_RATIOS[0] in m.values for m in instances) else None

    try:
        snapshot = eventually(snapshot_with_mig_gpm)
    finally:
        sampler.stop()
    text = render(View(snapshot=snapshot, backend=backend.name), timer=lambda: 0.0)

    parent = {"gpu": "0", "uuid": identities[0].uuid}
    for instance in ("1", "2"):
        labels = dict(parent, gpu_instance=instance, profile="3g.40gb")
        assert value(text, "gpu_mig_memory_total_bytes", **labels) == 40 * GIB
        assert value(text, "gpu_mig_memory_used_bytes", **labels) <= 40 * GIB
        for name in MIG_RATIOS:
            assert 0.0 <= value(text, name, **labels) <= 1.0
    assert series(text, "gpu_mig_memory_total_bytes", gpu="1") == {}
    assert value(text, "gpu_memory_total_bytes", **parent) == 80 * GIB


def test_mig_gpm_unsupported_leaves_ratios_out_keeps_memory_and_is_asked_once(backend, fake):
    fake.control({"gpu0.unsupported": "nvmlGpmMigSampleGet"})
    backend.discover()

    reading = read_until(backend, 0, lambda r: "gpu_sm_active_ratio" in r.values)  # whole-GPU GPM still works
    for _ in range(3):
        reading = backend.read(0)

    assert [m.gpu_instance_id for m in reading.mig] == [1, 2]
    for instance in reading.mig:
        assert set(instance.values) == set(MIG_MEMORY)
    assert fake.call_count("nvmlGpmMigSampleGet") == 1


def test_gpu_without_gpm_reports_mig_memory_only(backend, fake):
    fake.control({"gpu0.gpm": False})  # an A100: MIG, but no GPM
    backend.discover()
    for _ in range(3):
        reading = backend.read(0)

    assert [(m.profile, set(m.values)) for m in reading.mig] == [("3g.40gb", set(MIG_MEMORY))] * 2
    assert fake.call_count("nvmlGpmMigSampleGet") == 0


def test_mig_mode_not_supported_means_no_mig_and_is_asked_once(backend, fake):
    fake.control({"gpu0.unsupported": "nvmlDeviceGetMigMode"})
    backend.discover()
    for _ in range(3):
        assert backend.read(0).mig == ()
    assert fake.call_count("nvmlDeviceGetMigMode") == 1


def test_instances_are_listed_once_not_every_tick(backend, fake):
    backend.discover()
    for _ in range(5):
        assert len(backend.read(0).mig) == 2
    assert fake.call_count("nvmlDeviceGetMaxMigDeviceCount") == 1
    assert fake.call_count("nvmlDeviceGetMigDeviceHandleByIndex") == 7  # every possible slot, once


def test_new_instances_appear_at_the_next_refresh(fake, backends):
    backend = backends(mig_refresh_interval=0.0)
    backend.discover()
    assert [m.profile for m in backend.read(0).mig] == ["3g.40gb", "3g.40gb"]

    fake.control({"gpu0.mig": "3g.40gb,3g.40gb,1g.10gb"})
    assert [m.profile for m in backend.read(0).mig] == ["3g.40gb", "3g.40gb", "1g.10gb"]

    fake.control({"gpu0.mig": None})  # MIG mode switched off
    assert backend.read(0).mig == ()


def test_surviving_instances_keep_their_gpm_across_a_refresh(fake, backends):
    backend = backends(mig_refresh_interval=0.0)
    backend.discover()
    read_with_mig_gpm(backend)

    fake.control({"gpu0.mig": "3g.40gb,3g.40gb,1g.10gb"})
    reading = read_until(backend, 0, lambda r: len(r.mig) == 3)
    new, = [m for m in reading.mig if m.gpu_instance_id == 3]
    assert not set(MIG_RATIOS) & set(new.values), "a new instance starts without a previous sample"
    assert all(set(MIG_RATIOS) <= set(m.values) for m in reading.mig if m.gpu_instance_id != 3)


def test_a_destroyed_instance_is_dropped_on_the_tick_after_its_calls_fail(backend, fake):
    backend.discover()  # default refresh interval: only the failure can trigger this re-listing
    assert len(backend.read(0).mig) == 2

    fake.control({"gpu0.mig": "3g.40gb"})  # instance 2 destroyed: its handle is stale now
    stale = by_id(backend.read(0))
    assert set(MIG_MEMORY).isdisjoint(stale[2].values)
    assert [m.gpu_instance_id for m in backend.read(0).mig] == [1]
    assert fake.call_count("nvmlDeviceGetMaxMigDeviceCount") == 2


def test_mig_enabled_without_instances(backend, fake):
    fake.control({"gpu0.mig": ""})
    backend.discover()
    assert backend.read(0).mig == ()


def test_lost_mig_gpu_raises_and_recovers_its_instances(backend, fake):
    backend.discover()
    assert len(backend.read(0).mig) == 2

    fake.control({"gpu0.lost": True})
    with pytest.raises(GpuLost):
        backend.read(0)
    fake.control({"gpu0.lost": None})
    backend.recover(0)

    assert [m.gpu_instance_id for m in backend.read(0).mig] == [1, 2]


def test_mig_handles_are_not_gpu_handles_in_the_fake(backend, fake):
    """The fake must refuse whole-GPU calls on MIG handles, as a driver does, or the backend could
    read the parent's figures for a slice without any test noticing."""
    import pynvml

    backend.discover()
    parent = pynvml.nvmlDeviceGetHandleByIndex(0)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    assert pynvml.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert pynvml.nvmlDeviceGetName(mig) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)) == \
        pynvml.nvmlDeviceGetUUID(parent)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetUtilizationRates(mig)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetGpuInstanceId(parent)


@pytest.mark.parametrize("name, profile", [
    ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "3g.40gb"),
    ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "3g.20gb"),  # one of several compute instances
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
    ("NVIDIA H100 80GB HBM3", "unknown"),
])
def test_profile_comes_from_the_mig_device_name(name, profile):
    assert mig_profile(name) == profile
