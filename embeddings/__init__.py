"""Hierarchical embedding parameter server (device cache / volatile tier / RocksDB); arrives with its own issue."""
