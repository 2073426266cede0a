"""Install a finished artifact directory in one rename, and never after a Ctrl-C.

The export writes everything into a hidden temporary directory beside ``--out``; only a complete
directory within budget is swapped in, so a failed or interrupted export never leaves half an
artifact nor damages the previous one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class InterruptFlag:
    """Ctrl-C raises KeyboardInterrupt as usual *and* is remembered until the export ends.

    A call into a third-party library may catch the KeyboardInterrupt and carry on; once, a full
    test run saw an export signalled right after writing model.fp32.onnx exit 0 and install. The
    flag is checked again just before the install, so an interrupted export never replaces ``--out``.
    """

    def __init__(self):
        import signal
        import threading

        self.hit, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def install(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; the previous one is kept until the swap succeeded."""
    if not out.exists():
        os.rename(tmp, out)
        return
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)
