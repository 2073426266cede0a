"""``resdeploy`` command line: one entry point, one sub-command per pipeline job.

Errors a user can fix print one line naming the bad value and the fix, and exit 2; Ctrl-C exits
130. Library code logs through ``logging``; results go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from core.errors import ResdeployError
from resdeploy import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (with the hint to --help), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from resdeploy import export_cli, predict_cli, training_cli, triton_cli

    parser = OneLineParser(prog="resdeploy", description="Trained ResNets to production: train, "
                           "evaluate, export and compare residual networks.")
    parser.add_argument("--version", action="version", version=f"resdeploy {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.register(sub)
    export_cli.register(sub)
    predict_cli.register(sub)
    triton_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    quiet = args.quiet or os.environ.get("RANK", "0") != "0"  # one voice under torchrun
    # Libraries (onnxscript, onnxruntime, bentoml) stay at WARNING; our stages talk at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    for name in ("resdeploy", "training", "export", "serving", "predict"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except ResdeployError as e:
        print(f"resdeploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resdeploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
