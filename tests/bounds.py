"""Floors for assertions on the accuracy of a trained model (docs/test-bounds.md has the whole audit).

Training is deterministic per CPU but not across CPUs: another SIMD path rounds differently, and the
digits network the fixtures train (``digits_run``) is another network, right on other images. An
accuracy a test measures on a few images is therefore a draw, and a floor on it must hold for any
network the suite accepts, not only for the one trained on the CPU the test was written on.

The suite accepts a fixture network that is right on at least ``DIGITS_MIN_TOP1`` % of the 360 digits
test images (tests/test_training.py asserts it; measured 97.5-98.6% on eight seeds). ``min_correct`` is
the floor for ``n`` images of that kind: the fewest right answers such a network gives, except with
probability below ``TAIL`` (binomial, its mistakes independent of each other). A wrong label map,
another network or a broken preprocessing gives about 10% and stays far below it for n >= 8.
"""

from __future__ import annotations

import math

DIGITS_MIN_TOP1 = 95.0  # % of the 360 digits test images (18 wrong at most)
TAIL = 1e-4  # a correct product fails a floor once in 10,000 runs at worst


def min_correct(n: int, error_rate: float = 1 - DIGITS_MIN_TOP1 / 100, tail: float = TAIL) -> int:
    """The fewest right answers out of ``n`` that a network wrong on ``error_rate`` of its inputs gives,
    except with probability < ``tail``: n - t for the smallest t with P[Binomial(n, error_rate) > t] < tail.

    For the digits floor: 4 of 8, 23 of 30, 214 of 240, 325 of 360, 923 of 1000.
    """
    below = 0.0  # P[errors <= t]
    for t in range(n + 1):
        below += math.comb(n, t) * error_rate ** t * (1 - error_rate) ** (n - t)
        if 1 - below < tail:
            return n - t
    return 0
