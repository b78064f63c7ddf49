"""Reading the agent's config files (--config, the web config files): bounded, and regular files only.

A config path may name anything: a FIFO (whose open() waits for a writer and would hang
start-up), /dev/zero or /dev/urandom (endless), a directory, a socket, a multi-gigabyte log.
read_config_text stats the path before opening it, opens it without blocking, checks again on
the open descriptor (the path may have been swapped in between), and reads at most the cap plus
one byte, so a file that grows or lies about its size cannot be read without bound either.

Both config files are YAML. compose_yaml and construct_yaml turn every YAML failure into a
ConfigFileError with its line, and bound what constructing a value may cost before PyYAML does
it: int() of 100,000 digits raises, and a 1 MiB sexagesimal int (1:0:0:...) multiplies ever
larger numbers for minutes. Aliases are nodes shared, not copied, so alias bombs stay small.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

# Far above any real config file (a few KiB), far below what could hurt the agent's memory.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_SCALAR_CHARS = 4096  # one YAML scalar: a path, a URL, a header value, a bcrypt hash
MAX_YAML_NODES = 100_000  # nodes under one constructed value, each counted once

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class ConfigFileError(ValueError):
    """The file cannot be used; `reason` says why (without the path) and `line` where, if known."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.line = line

    def where(self, path: str) -> str:
        """'path:line' (or 'path'), the start every config error message takes."""
        return f"{path}:{self.line}" if self.line else path


def check_regular_file(path: str) -> None:
    """Refuse anything but an existing regular file (followed through symlinks), without opening it."""
    _check_mode(_stat(path, os.stat))


def read_config_bytes(path: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The whole content of the regular file `path`, at most `limit` bytes; ConfigFileError otherwise."""
    check_regular_file(path)  # before open(): opening a FIFO or a device may block or have effects
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ConfigFileError(f"cannot open: {err.strerror or err}") from None
    try:
        status = _stat(fd, os.fstat)
        _check_mode(status)
        if status.st_size > limit:
            raise _too_large(limit)
        chunks, total = [], 0
        while total <= limit:
            try:
                chunk = os.read(fd, min(65536, limit + 1 - total))
            except OSError as err:
                raise ConfigFileError(f"cannot read: {err.strerror or err}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_config_text(path: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """read_config_bytes decoded as UTF-8; a byte that is not names its line."""
    data = read_config_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigFileError(f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})",
                              line) from None


def _stat(target, function) -> os.stat_result:
    try:
        return function(target)
    except OSError as err:
        raise ConfigFileError(err.strerror or str(err)) from None
    except ValueError as err:  # a NUL byte in the path
        raise ConfigFileError(f"unusable path: {err}") from None


def _check_mode(status: os.stat_result) -> None:
    if stat.S_ISREG(status.st_mode):
        return
    kind = next((name for test, name in _KINDS if test(status.st_mode)), "not a plain file")
    raise ConfigFileError(f"not a regular file ({kind})")


def _too_large(limit: int) -> ConfigFileError:
    size = f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"
    return ConfigFileError(f"larger than {size}, the limit for a config file")


def compose_yaml(text: str) -> tuple[yaml.SafeLoader, yaml.Node | None]:
    """The node tree of a one-document YAML text, and its loader (the caller disposes of it)."""
    try:
        loader = yaml.SafeLoader(text)  # checks every character first
    except yaml.YAMLError as err:
        raise _yaml_error(err, text) from None
    try:
        return loader, loader.get_single_node()
    except yaml.YAMLError as err:
        loader.dispose()
        raise _yaml_error(err, text) from None
    except RecursionError:  # [[[[...: the line reached so far
        line = loader.get_mark().line + 1
        loader.dispose()
        raise ConfigFileError("invalid YAML: nested too deeply", line) from None


def construct_yaml(loader: yaml.SafeLoader, node: yaml.Node, max_nodes: int = MAX_YAML_NODES,
                   max_chars: int = MAX_SCALAR_CHARS) -> Any:
    """The Python value of `node`, once every scalar under it is at most max_chars and there are
    at most max_nodes nodes; ConfigFileError (with the line) for those and for values PyYAML
    cannot build: an unknown or unsafe tag (!!python/object), bad !!binary, a date 2001-13-45."""
    seen: set[int] = set()
    scalars: list[yaml.ScalarNode] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if len(seen) > max_nodes:
            raise ConfigFileError(f"more than {max_nodes} items", node.start_mark.line + 1)
        if isinstance(current, yaml.ScalarNode):
            if len(current.value) > max_chars:
                raise ConfigFileError(f"value longer than {max_chars} characters", current.start_mark.line + 1)
            scalars.append(current)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        else:
            stack.extend(item for pair in current.value for item in pair)
    try:
        return loader.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark or node.start_mark
        raise ConfigFileError(str(err.problem or err.context), mark.line + 1) from None
    except (ValueError, OverflowError, TypeError) as err:
        raise ConfigFileError(f"invalid value: {err}", _failing_line(loader, scalars, node)) from None
    except RecursionError:
        raise ConfigFileError("nested too deeply", node.start_mark.line + 1) from None


def _failing_line(loader: yaml.SafeLoader, scalars: list[yaml.ScalarNode], node: yaml.Node) -> int:
    """The line of the first scalar PyYAML cannot build (it does not say which one it was)."""
    for scalar in sorted(scalars, key=lambda n: n.start_mark.index):
        loader.constructed_objects, loader.recursive_objects = {}, {}  # left over by the failure
        try:
            loader.construct_object(scalar)
        except (yaml.YAMLError, ValueError, OverflowError, TypeError):
            return scalar.start_mark.line + 1
    return node.start_mark.line + 1


def _yaml_error(err: yaml.YAMLError, text: str) -> ConfigFileError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        return ConfigFileError(f"invalid YAML: {err.problem or err.context}", mark.line + 1 if mark else None)
    if isinstance(err, yaml.reader.ReaderError):
        return ConfigFileError(f"invalid YAML: character {err.character:#x} is not allowed",
                               text.count("\n", 0, err.position) + 1)
    return ConfigFileError(f"invalid YAML: {err}")
