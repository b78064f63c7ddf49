"""The demo's scenarios: which services run on which simulated GPUs, and how they load them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from gpuphase.agent.backends.sim import PHASE_ACTIVITY, Activity
from gpuphase.demo.workload import ServiceLoad

# Decode on a small model with long outputs: the memory wall (DRAM busy, tensor cores starved).
MEMORY_BOUND = {**PHASE_ACTIVITY,
                "decode": Activity(busy=1.0, sm_active=0.78, sm_occupancy=0.20, tensor_active=0.07, dram_active=0.88,
                                   fp16_active=0.06, fp32_active=0.04)}


DEMO_SETTLE = 30.0


@dataclass(frozen=True)
class Scenario:
    description: str
    gpus: int
    loads: tuple[ServiceLoad, ...]
    # GPUs whose process holds this share of VRAM (overrides the load's memory_fraction).
    memory_fraction: dict[int, float] | None = None


def _llama70b(gpus: tuple[int, ...], rate: float) -> ServiceLoad:
    return ServiceLoad("llama-70b", gpus, arrival_rate=rate)


# The characters Kubernetes draws generated name parts from (k8s.io/apimachinery rand.SafeEncodeString).
_KUBE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def on_kubernetes(load: ServiceLoad, namespace: str = "inference", container: str = "vllm") -> ServiceLoad:
    """The load as the one pod of a Deployment named after its service: a pod name shaped as a
    ReplicaSet generates it (<deployment>-<pod-template-hash>-<5 characters>), the same on every run."""
    digest = hashlib.sha256(f"{namespace}/{load.service}".encode()).digest()
    chars = [_KUBE_ALPHABET[b % len(_KUBE_ALPHABET)] for b in digest[:15]]
    pod = f"{load.service}-{''.join(chars[:10])}-{''.join(chars[10:])}"
    return replace(load, pod=pod, namespace=namespace, container=container)


SCENARIOS: dict[str, Scenario] = {
    "mixed-fleet": Scenario(
        "a Kubernetes node with 5 GPUs: llama-70b on GPUs 0-1 (TP2, healthy), chat-8b decode-heavy "
        "memory-bound on GPU 2, GPU 3 allocated but idle with VRAM nearly full, GPU 4 unused; "
        "one vLLM pod each in namespace inference",
        gpus=5,
        loads=tuple(on_kubernetes(load) for load in (
            _llama70b((0, 1), 3.0),
            ServiceLoad("chat-8b", (2,), arrival_rate=4.0, prompt_tokens=(200, 80), output_tokens=(900, 300),
                        prefill_tokens_per_second=40000.0, decode_step_seconds=0.012, max_batch=64,
                        activity=MEMORY_BOUND),
            ServiceLoad("reserved", (3,)),
        )),
        memory_fraction={3: 0.97},
    ),
    "steady": Scenario("2 GPUs: llama-70b on TP2 under steady traffic", gpus=2, loads=(_llama70b((0, 1), 3.0),)),
    "idle-allocated": Scenario("2 GPUs held by a server that gets no traffic", gpus=2,
                               loads=(ServiceLoad("llama-70b", (0, 1)),)),
    "memory-bound": Scenario(
        "1 GPU: small model, long outputs: decode-dominated and DRAM-bound", gpus=1,
        loads=(ServiceLoad("chat-8b", (0,), arrival_rate=4.0, prompt_tokens=(200, 80), output_tokens=(900, 300),
                           prefill_tokens_per_second=40000.0, decode_step_seconds=0.012, max_batch=64,
                           activity=MEMORY_BOUND),)),
    "traffic-cycle": Scenario(
        "2 GPUs: chat-4b on TP2 whose traffic rises and falls, 60 s at 0.1 requests/s then 60 s at 3/s, "
        "repeated (watch the scaling signals follow)",
        gpus=2,
        loads=(ServiceLoad("chat-4b", (0, 1), prompt_tokens=(300, 100), output_tokens=(40, 10),
                           rate_cycle=((60.0, 0.1), (60.0, 3.0))),),
    ),
    "phase-blocks": Scenario(
        "1 GPU: a scripted 8 s cycle of 1.5 s prefill, 2 s decode, 1.5 s mixed, ~3 s idle (for checking accuracy)",
        gpus=1,
        loads=(ServiceLoad("blocks", (0,), script=((0.0, 1.5, 3.5), (3.5, 1.5, 0.04)), script_cycle=8.0),),
    ),
}
