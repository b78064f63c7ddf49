"""`python -m benchmarks [--quick] [--only KEY ...] [--output PATH]`: run the benchmarks, write the report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks import attacks, bounds, fleet_report, footprint, intake, peers, sampling, scrape
from benchmarks.harness import ROOT, machine
from benchmarks.report import render_report
from benchmarks.results import Section

# In report order; each module has run(**kwargs) -> Section and quick_kwargs().
BENCHMARKS = {"intake": intake, "sampling": sampling, "scrape": scrape, "footprint": footprint,
              "bounds": bounds, "peers": peers, "attacks": attacks, "fleet-report": fleet_report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows (about 3 minutes in all)")
    parser.add_argument("--load-minutes", type=float, default=None,
                        help="minutes of the memory/CPU soak under 2,000 spans/s (default 30, --quick 1)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"), help="Markdown report path")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--reuse", default="",
                        help="with --only: take the other sections from this earlier --json file (noted in the report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    earlier = {}
    if args.reuse:
        earlier = {d["key"]: Section.from_dict(d) for d in json.loads(Path(args.reuse).read_text(encoding="utf-8"))}
    sections = []
    for key, module in BENCHMARKS.items():
        if args.only and key not in args.only:
            if key in earlier:
                section = earlier[key]
                section.notes.append("(Kept from an earlier run on the same machine by --reuse; the sections "
                                     "named after --only in the header were re-run later.)")
                sections.append(section)
            continue
        kwargs = module.quick_kwargs() if args.quick else {}
        if key == "footprint" and args.load_minutes is not None:
            kwargs["load_minutes"] = args.load_minutes
        started = time.monotonic()
        print(f"[benchmarks] {key} ...", file=sys.stderr, flush=True)
        sections.append(module.run(**kwargs))
        print(f"[benchmarks] {key} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    if args.load_minutes is not None:
        command += f" --load-minutes {args.load_minutes:g}"
    if args.only:
        command += " --only " + " ".join(args.only) + (" --reuse EARLIER.json" if args.reuse else "")
    report = render_report(machine(), sections, command)
    Path(args.output).write_text(report, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps([s.to_dict() for s in sections], indent=2), encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
