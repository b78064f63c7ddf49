"""Device memory (VRAM): total, used and free, all from one reading so used + free = total.

Entirely table-driven: every memory metric in agent/metrics.yaml is read from the GPU sample
under its own name (see exporters.collectors._families.reading_families).
"""

from exporters.collectors._families import table_collector

collect = table_collector("memory")
