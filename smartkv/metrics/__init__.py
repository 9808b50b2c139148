"""Metrics: task scores (LongBench, RULER), quality vs a reference (KL, NLL, agreement, errors), speed."""
from smartkv.metrics.task import metric_names, score  # noqa: F401

__all__ = ["score", "metric_names"]
