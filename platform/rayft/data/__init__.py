"""Data: sources -> canonical messages -> templates -> tokens + labels -> packed parquet."""
