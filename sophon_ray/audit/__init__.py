"""Robustness audit: attack suites and the worst-case verdict (pure), Ray Tune driver (lazy)."""
