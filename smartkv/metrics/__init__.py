"""Metrics: task scores (LongBench, RULER), quality vs a reference (KL, NLL, agreement, errors), speed."""
from smartkv.metrics.task import metric_names, score

__all__ = ["metric_names", "score"]
