"""PCIe and NVLink traffic counters and PCIe link replays.

Entirely table-driven: every interconnect metric in agent/metrics.yaml is read from the GPU sample
under its own name (see exporters.collectors._families.reading_families).
"""

from exporters.collectors._families import table_collector

collect = table_collector("interconnect")
