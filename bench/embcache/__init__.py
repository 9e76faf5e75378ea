"""The parts of bench/embedding_cache.py: hit rates, throughput, DLRM end to end, one call's cost, the report."""
