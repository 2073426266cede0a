"""Expand ``resdeploy predict`` INPUT… into one sorted, de-duplicated list of files.

An INPUT is a folder (every file under it, recursively, hidden ones skipped), a path list (a file
ending in ``.txt`` or ``.lst``: one path per line, relative ones resolved against the list's folder,
blank lines and ``#`` comments ignored), a glob (``photos/**/*.jpg``; ``**`` recurses), or one file.
Folders and globs take every file, not only image suffixes: a file that is not an image becomes a
row with an error, so nothing a user pointed at disappears silently.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from core.errors import ConfigError

LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = set("*?[")


def _walk(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return out


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the path list {path}: {e}") from None
    base = path.parent
    return [str(base / s) if not os.path.isabs(s) else s
            for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Absolute, normalised paths of every file the INPUTs name, sorted, each once.

    Paths listed in a path file are kept even if missing: they become error rows (the list is the
    user's statement of what to classify). An INPUT that names nothing is an error.

    Raises:
        ConfigError: an INPUT that does not exist, or a glob or folder that matches no file.
    """
    found: list[str] = []
    for item in inputs:
        p = Path(item)
        if set(item) & GLOB_CHARS and not p.exists():
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ConfigError(f"the glob {item!r} matches no file; quote it so the shell does not expand it, "
                                  "and use ** to recurse (e.g. 'photos/**/*.jpg')")
            found += matches
        elif p.is_dir():
            files = _walk(p)
            if not files:
                raise ConfigError(f"the folder {item} holds no files")
            found += files
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            found += _read_list(p)
        elif p.is_file():
            found.append(item)
        else:
            raise ConfigError(f"input {item!r} does not exist; give an image folder, a path list (.txt/.lst), "
                              "a glob or an image file")
    return sorted({os.path.abspath(f) for f in found})
