"""Error types shared by every stage. Free of torch so that serving can import it.

The command line prints ``str(error)`` of a :class:`ResdeployError` as one line and exits
non-zero, so messages name the bad value and the fix.
"""


class ResdeployError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(ResdeployError, ValueError):
    """A bad option value (unknown architecture, out-of-range number, conflicting flags)."""


class DatasetError(ResdeployError):
    """A dataset that is missing, malformed or not of a known layout."""


class CheckpointError(ResdeployError):
    """A checkpoint that cannot be read or does not fit the requested network."""


class PreprocessError(ResdeployError, ValueError):
    """An image that cannot be decoded or preprocessed (corrupt, too large, bad mode)."""


class ExportError(ResdeployError):
    """An export step failed (ONNX export, conversion, quantization, engine build)."""


class ArtifactError(ResdeployError):
    """An artifact directory that is missing, malformed, tampered with or built for other hardware."""


class BackendError(ResdeployError):
    """An inference backend that is unavailable or was given input it cannot take."""


class AccuracyGateError(ExportError):
    """One or more artifacts fell outside their accuracy budget."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``str(error)`` (cut to ``limit`` characters), else the error's
    type name: third-party messages run to pages, and some are empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__
