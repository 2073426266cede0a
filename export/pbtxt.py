"""Protobuf text format (``.pbtxt``) from a message's JSON form, without protobuf.

Written for Triton's ``config.pbtxt`` (export/triton.py): enum fields are named in
:data:`ENUM_FIELDS` (JSON writes enums as strings too, text format writes them bare) and map fields
in :data:`MAP_FIELDS` (JSON objects, text format key/value entries). tests/test_triton_repo.py parses
the output with Triton's own schema.
"""

from __future__ import annotations

ENUM_FIELDS = {"data_type", "format", "kind"}  # model_config.proto's enum-typed fields we write
MAP_FIELDS = {"inputs", "parameters"}  # ModelWarmup.inputs, ModelConfig.parameters


def quote(text: str) -> str:
    """A string literal: printable ASCII as is, ``\\`` and ``"`` escaped, every other byte (of UTF-8) octal."""
    out = []
    for b in text.encode("utf-8"):
        c = chr(b)
        out.append("\\" + c if c in '\\"' else c if 0x20 <= b < 0x7F else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _scalar(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if key in ENUM_FIELDS else quote(value)
    return repr(value)


def to_pbtxt(message: dict, comments: list[str] = (), indent: int = 0) -> str:
    """The text format of a JSON-form message: objects as ``key { ... }`` blocks, lists of objects as
    ``key [ {...}, {...} ]``, scalar lists as ``key: [ 1, 2 ]``, maps as ``key { key: "k" value ... }``
    entries, enum fields bare. ``comments`` (``# ...`` lines) open the text."""
    pad, lines = "  " * indent, [f"# {' '.join(c.splitlines())}" for c in comments]
    for key, value in message.items():
        if key in MAP_FIELDS and isinstance(value, dict):
            for k, v in value.items():
                entry = ([f"{pad}  value {{", to_pbtxt(v, indent=indent + 2), f"{pad}  }}"] if isinstance(v, dict)
                         else [f"{pad}  value: {_scalar(key, v)}"])
                lines += [f"{pad}{key} {{", f"{pad}  key: {quote(k)}", *entry, f"{pad}}}"]
        elif isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent=indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            blocks = [f"{pad}  {{\n{to_pbtxt(v, indent=indent + 2)}\n{pad}  }}" for v in value]
            lines += [f"{pad}{key} [", ",\n".join(blocks), f"{pad}]"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(key, value)}")
    return "\n".join(line for line in lines if line)
