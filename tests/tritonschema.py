"""Triton's own model configuration schema, to check the ``config.pbtxt`` files ``resdeploy triton`` writes.

``tritonclient.grpc``'s package needs grpcio, but its generated ``model_config_pb2.py`` needs only
protobuf: it is loaded here by file path. Parsing is strict: an unknown field, a bad enum value or
a malformed literal raises ``google.protobuf.text_format.ParseError``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


@functools.cache
def schema():
    """The ``model_config_pb2`` module of the installed tritonclient."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_pbtxt(text: str):
    """A ``ModelConfig`` message from protobuf text format."""
    from google.protobuf import text_format

    return text_format.Parse(text, schema().ModelConfig())


def parse_json(config: dict):
    """A ``ModelConfig`` message from its JSON form (unknown keys refused)."""
    from google.protobuf import json_format

    return json_format.ParseDict(config, schema().ModelConfig())


def enum(name: str) -> int:
    """The number of a ``model_config.proto`` enum value by name (``TYPE_FP32``, ``KIND_GPU``, ...)."""
    s = schema()
    for enum_type in (s.DataType, s.ModelInput.Format, s.ModelInstanceGroup.Kind):
        if name in enum_type.keys():
            return enum_type.Value(name)
    raise KeyError(name)
