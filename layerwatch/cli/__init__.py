"""The ``layerwatch`` command line: ``main`` dispatches to one front end per subcommand (``demo``, ``trajectory``,
``report``); each front end parses its flags and calls the engine in ``layerwatch.analysis`` or the demo."""

from layerwatch.cli.main import main

__all__ = ["main"]
