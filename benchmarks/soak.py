"""`python -m benchmarks.soak --duration 30m`: an 8-GPU sim agent under 2,000 spans/s, RSS and CPU every 10 s.

See benchmarks/footprint.TOPOLOGIES for how the load's services sit on the GPUs.

The same measurement as the load part of `python -m benchmarks` (benchmarks/footprint.py), for
as long as you like; prints a Markdown table and, with --output, writes it to a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.footprint import LOAD_SPANS_PER_SECOND, TOPOLOGIES, soak, soak_table
from benchmarks.harness import machine
from benchmarks.report import markdown_table
from gpuphase.agent.config import parse_duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--duration", default="30m", help="e.g. 30m, 2h, 90s (default 30m)")
    parser.add_argument("--spans-per-second", type=float, default=LOAD_SPANS_PER_SECOND)
    parser.add_argument("--every", default="10s", help="sampling period of RSS and CPU")
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="replicas",
                        help="replicas: one vLLM per GPU (default); tp8: one service on all eight GPUs")
    parser.add_argument("--output", default="", help="write the Markdown here as well")
    args = parser.parse_args(argv)
    result = soak(parse_duration(args.duration) / 60, args.spans_per_second, parse_duration(args.every),
                  topology=args.topology)
    lines = [f"Soak: {args.duration} at {args.spans_per_second:,.0f} spans/s ({args.topology}) on "
             + ", ".join(f"{k} {v}" for k, v in machine().items()), "", *markdown_table(soak_table(result["rows"]))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
