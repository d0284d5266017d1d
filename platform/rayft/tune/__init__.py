"""Sweeps: Ray Tune over multi-worker training trials (space: what is explored; sweep: the
experiment, its trials' outcomes and best.yaml; plots: the sweep's picture)."""
