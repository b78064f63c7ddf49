"""What every part of the NVML backend shares: how errors are sorted, plain ctypes structs, the
direct call through pynvml's function pointers, and small conversions."""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml

# "This GPU cannot do that": probe once, remember, leave the series out.
CAPABILITY_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})
# "The GPU itself is gone": fell off the bus, needs or just had a reset, or NVML lost its state.
LOST_ERRORS = frozenset({
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_GPU_NOT_FOUND,
    pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_UNKNOWN,
    pynvml.NVML_ERROR_UNINITIALIZED,
})

NVML_SUCCESS = pynvml.NVML_SUCCESS


def answer_layout(struct_type: type, *members: tuple[str, str]) -> str:
    """A struct-module format of one `struct_type`: the named members (in layout order) as the given
    codes, the bytes between them skipped, so a whole array of answers is read in one C call
    rather than member by member through ctypes, which builds an object per element."""
    layout, at = "", 0
    for name, code in members:
        member = getattr(struct_type, name)
        layout += f"{member.offset - at}x{code}"
        at = member.offset + member.size
    return layout + f"{ctypes.sizeof(struct_type) - at}x"


def plain_struct(struct_type: type) -> type:
    """A ctypes.Structure with the layout of one of pynvml's structs, minus its base class's
    Python-level __getattribute__ and __setattr__ hooks (they convert bytes and friendly values;
    the members used through these are all numbers and pointers). The hooks dominated the
    backend's CPU for the requests filled in every tick (docs/design-figures.md)."""
    return type(f"Plain{struct_type.__name__}", (ctypes.Structure,), {"_fields_": struct_type._fields_})


def call_nvml(function: str, *args: Any) -> None:
    """NVML's `function` called straight through pynvml's cached function pointer, raising NVMLError
    as pynvml's wrappers do: for the requests this module allocates once per GPU (see FieldRequest)."""
    status = pynvml._nvmlGetFunctionPointer(function)(*args)
    if status != NVML_SUCCESS:
        raise pynvml.NVMLError(status)


def clamp_ratio(percent: float) -> float:
    return min(1.0, max(0.0, percent / 100.0))


def handle_address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


def text(value: str | bytes) -> str:
    """pynvml returns str from most getters but bytes from some struct members, depending on version."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def decode_cuda_version(encoded: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"
