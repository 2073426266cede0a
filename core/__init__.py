"""The contract every stage shares: the ground floor of resdeploy.

Preprocessing, the artifact manifest and its file names, the flavour table, the Backend
interface, errors, atomic file writes and softmax/top-k. Torch-free, and it imports no stage
(training/, backends/, export/, serving/, resdeploy/, bench/): ``tests/test_layout.py`` checks
the import graph. See docs/design.md, "Layout".
"""

__version__ = "0.1.0"
