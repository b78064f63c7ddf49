"""Writes the Grafana dashboards users import, and lists every panel query for end-to-end checks.

    python -m gpuphase.dashboards.build            write dashboards/*.json
    python -m gpuphase.dashboards.build --check    exit 1 if a committed JSON file is stale (CI)

Grafana cannot run here, so the proof that a dashboard works is that each of its queries, with
the template variables filled in, returns data from a real Prometheus: `all_queries()` gives
them to the end-to-end test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from gpuphase.dashboards import fleet, node, phases
from gpuphase.dashboards.grafana import Dashboard

OUTPUT_DIR = Path(__file__).resolve().parent

DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "gpuphase-fleet.json": fleet.build,
    "gpuphase-node.json": node.build,
    "gpuphase-phases.json": phases.build,
}


def render(build: Callable[[], Dashboard]) -> str:
    return json.dumps(build().to_json(), indent=2, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    return {name: render(build) for name, build in DASHBOARDS.items()}


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} the way Grafana would; an unknown variable is an error, not a blank."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def all_queries(instance_regex: str = ".*", gpu_regex: str = ".*", *, service_regex: str = ".*",
                rate_interval: str = "1m", time_range_seconds: int = 3600, gpu_hour_price: str = "2.50",
                include_sparse: bool = True) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL) for every query of every dashboard, variables filled in.

    include_sparse=False leaves out the queries that are legitimately empty on a healthy host
    (XID events, MIG instances, rejected spans): the rest must return data wherever the agent runs.
    """
    values = {
        "instance": instance_regex, "gpu": gpu_regex, "service": service_regex,
        "__rate_interval": rate_interval, "__interval": rate_interval,
        "__range": f"{time_range_seconds}s", "__range_s": str(time_range_seconds),
        "gpu_hour_price": gpu_hour_price,
    }
    out = []
    for build in DASHBOARDS.values():
        dashboard = build()
        for panel in dashboard.panels():
            for query in panel.queries:
                if include_sparse or not query.sparse:
                    out.append((dashboard.title, panel.title, substitute(query.expr, values)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuphase.dashboards.build", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output-dir", type=Path, default=OUTPUT_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = args.output_dir / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m gpuphase.dashboards.build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
