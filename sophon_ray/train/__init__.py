"""Ray Train layer: distributed protection (driver, per-worker loop, checkpoint format)."""
