"""Pickle payloads with a visible side effect: stand-ins for arbitrary code in a planted file."""

from __future__ import annotations

import os
import shlex


class CreatesMarker:
    """Unpickling this opens (and so creates) a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))
