"""Protobuf wire format by hand, for shapes protobuf's own encoder refuses or would take too long
to build (malformed varints, millions of empty spans)."""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes | str) -> bytes:
    """A length-delimited field (wire type 2): strings and embedded messages."""
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data
