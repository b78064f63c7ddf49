"""Activity ratios from NVML GPM (Hopper and newer); absent on GPUs without GPM.

Entirely table-driven: every gpm metric in agent/metrics.yaml is read from the GPU sample
under its own name (see exporters.collectors._families.reading_families).
"""

from exporters.collectors._families import table_collector

collect = table_collector("gpm")
