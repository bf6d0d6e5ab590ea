"""Adapters that connect :class:`layerwatch.LayerWatch` to training frameworks.

- :mod:`layerwatch.integrations.hf_trainer`: ``LayerWatchCallback`` for the Hugging Face ``Trainer``.
- :mod:`layerwatch.integrations.accelerate_loop`: a one-line call per iteration of an Accelerate loop.
- :mod:`layerwatch.integrations.lightning`: ``LayerWatchCallback`` for Lightning (the ``lightning`` extra).
"""
