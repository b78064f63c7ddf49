"""ECC errors, remapped HBM rows and XID events.

Entirely table-driven: every errors metric in agent/metrics.yaml is read from the GPU sample
under its own name (see exporters.collectors._families.reading_families).
"""

from exporters.collectors._families import table_collector

collect = table_collector("errors")
