"""Benchmarks with the papers' protocols: VTAB-1k (:mod:`.vtab`), with published numbers (:mod:`.published`)."""
