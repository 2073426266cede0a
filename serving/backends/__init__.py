"""Inference backends behind one interface (Polygraphy's runner shape: activate / infer /
deactivate, usable as a context manager, input checked on every call).

``onnxruntime`` and ``tensorrt`` live here and import nothing heavy until activated; the PyTorch
reference backend lives where torch is allowed (training/).
"""

from serving.backends.base import Backend

__all__ = ["Backend"]
