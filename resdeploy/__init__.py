"""resdeploy: trained residual networks to production.

The pipeline lives in the top-level packages ``training`` (networks, data, training,
evaluation), ``export`` (ONNX artifacts), ``serving`` (BentoML service, torch-free) and
the ``bench`` scripts; this package holds the command line and the shared error types.
"""

__version__ = "0.1.0"
