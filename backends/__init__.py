"""Runtime backends behind one interface, :class:`core.backend.Backend` (Polygraphy's runner
shape: activate / infer / deactivate, usable as a context manager, input checked on every call).

``onnxruntime`` and ``tensorrt`` import nothing heavy until activated and never import torch (the
service ships them in a torch-free image); ``pytorch`` is the reference backend and needs torch
and the training stage.
"""
