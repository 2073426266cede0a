"""Progress bar and the end-of-run summary shared by both engines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class Progress:
    """A tqdm bar in images (images/s as its rate), or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.args = (total, enabled, desc)

    def update(self, n: int, errors: int | None = None) -> None:
        total, enabled, desc = self.args
        if self.bar is None and enabled:  # opened at the first result, after the model's load messages
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
        if self.bar is not None:
            self.bar.update(n)
            if errors is not None:
                self.bar.set_postfix(errors=errors, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunStats:
    """What one run did: images this run, errors, wall time, time in the model and waiting for decode."""

    engine: str
    workers: int = 0  # local: decode processes; ray: model actors
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    model_s: float = 0.0
    wait_s: float = 0.0
    extra: dict = field(default_factory=dict)
    _t0: float = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, images: int) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.images = images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {"engine": self.engine, "images": self.images, "errors": self.errors, "seconds": round(self.seconds, 3),
             "images_per_s": round(self.images_per_s, 2)}
        if self.engine == "local":  # timed in this process; Ray's actors and tasks are not timed here
            d |= {"workers": self.workers, "model_s": round(self.model_s, 3), "decode_wait_s": round(self.wait_s, 3)}
        else:
            d["num_actors"] = self.workers
        return d | self.extra
