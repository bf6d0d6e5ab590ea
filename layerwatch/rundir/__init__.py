"""A run directory and everything written to it or read from it.

``files`` (names and atomic writes: the leaf), ``record`` (one probe's record, typed alerts, tags), ``writers``
(the ``Writer`` base class, JSONL and TensorBoard), ``trackers`` (W&B, MLflow, Accelerate trackers), ``images``
(the pictures), ``claim`` (one live writer per directory, which writers a run gets) and ``runs`` (``read_run``).
"""
