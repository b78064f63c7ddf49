"""The `gpuphase report` command's body: parse what the flags gave, build, render, write."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpuphase.model.durations import parse_duration
from gpuphase.report import prices as price_files
from gpuphase.report.api import ApiAuth, ApiError, PrometheusApi
from gpuphase.report.build import build_report
from gpuphase.report.collect import ReportDataError, terminal_progress

FORMATS = ("text", "markdown", "json", "html")


class ReportUsageError(ValueError):
    """A flag's value cannot be used (exit 2, like a usage error)."""


def parse_end(text: str, now: float | None = None) -> float:
    """`now`, Unix seconds, or an RFC 3339 time (2026-12-01T00:00:00Z)."""
    now = time.time() if now is None else now
    value = text.strip()
    if value in ("", "now"):
        return now
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ReportUsageError(f"--end {text!r}: expected now, Unix seconds or an RFC 3339 time "
                               "such as 2026-12-01T00:00:00Z") from None
    if parsed.tzinfo is None:
        raise ReportUsageError(f"--end {text!r}: give a time zone (Z or +01:00)")
    return parsed.timestamp()


def parse_range(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ReportUsageError(f"--range {text!r}: expected a positive duration such as 30m, 7d or 4w")
    return seconds


def _secret(path: str | None, flag: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportUsageError(f"{flag} {path}: {getattr(err, 'strerror', None) or err}") from None


def price_book(gpu_hour: float | None, price_file: str | None, currency: str) -> price_files.PriceBook:
    if gpu_hour is not None and price_file:
        raise ReportUsageError("give --price.gpu-hour or --price.file, not both")
    if gpu_hour is not None and gpu_hour < 0:
        raise ReportUsageError(f"--price.gpu-hour {gpu_hour:g}: a price cannot be negative")
    if price_file:
        try:
            return price_files.load(price_file)
        except price_files.PriceFileError as err:
            raise ReportUsageError(str(err)) from None
    return price_files.flat(gpu_hour, currency)


def render(report: dict[str, Any], fmt: str, pretty_json: bool = False) -> str:
    if fmt == "json":
        # Indented for a person at a terminal; compact otherwise (the C encoder: 800 GPUs in
        # 0.1 s instead of 2 s; `jq .` indents it when wanted).
        return json.dumps(report, indent=2 if pretty_json else None) + "\n"
    if fmt == "html":
        from gpuphase.report.html import render_html

        return render_html(report)
    from gpuphase.report.render import render_markdown, render_text

    return render_markdown(report) if fmt == "markdown" else render_text(report)


def write(text: str, output: str | None) -> None:
    """To stdout, or to the file whole or not at all (a half-written report is worse than none)."""
    if not output or output == "-":
        sys.stdout.write(text)
        return
    target = Path(output)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(*, url: str, range_text: str, end_text: str, selector: str, gpu_hour: float | None, price_file: str | None,
        currency: str, fmt: str, output: str | None, timeout: float, auth: dict[str, Any]) -> int:
    """Exit status: 0 written; 1 the store could not answer or held nothing; 2 a flag or file is wrong."""
    try:
        prices = price_book(gpu_hour, price_file, currency)
        range_seconds = parse_range(range_text)
        end = parse_end(end_text)
        api_auth = ApiAuth(username=auth.get("username") or "",
                           password=_secret(auth.get("password_file"), "--prometheus.password-file"),
                           bearer_token=_secret(auth.get("bearer_token_file"), "--prometheus.bearer-token-file"),
                           ca_file=auth.get("ca_file") or "", cert_file=auth.get("cert_file") or "",
                           key_file=auth.get("key_file") or "",
                           insecure_skip_verify=bool(auth.get("insecure_skip_verify")))
        api = PrometheusApi(url, api_auth, timeout)
    except (ReportUsageError, ApiError) as err:
        print(f"gpuphase report: {err}", file=sys.stderr)
        return 2
    try:
        report = build_report(api, selector=selector, end=end, range_seconds=range_seconds, prices=prices,
                              progress=terminal_progress)
    except (ApiError, ReportDataError) as err:
        print(f"gpuphase report: {err}", file=sys.stderr)
        return 1
    try:
        write(render(report, fmt, pretty_json=not output and sys.stdout.isatty()), output)
    except OSError as err:
        print(f"gpuphase report: cannot write {output}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0
