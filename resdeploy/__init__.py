"""resdeploy: trained residual networks to production.

This package is the command line, the top floor: ``cli.py`` (the ``resdeploy`` command),
``training_cli.py`` and ``export_cli.py`` (the sub-commands), ``cliargs.py`` (argument types). The
pipeline lives in the top-level packages below it: ``core`` (the contract), ``training``,
``backends``, ``export`` and ``serving``; see docs/design.md, "Layout".
"""

from core import __version__

__all__ = ["__version__"]
