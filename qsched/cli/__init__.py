"""The ``qsched`` command line: one entry point, one module per subcommand.

The CLI parses and validates arguments and calls library functions; library
code never sees an ``argparse`` namespace. Errors a user can fix print one line
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Sequence

from qsched.errors import QSchedError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like the rest of qsched's errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from qsched.cli import calibrate, evaluate, families, generate, quantize, study, tiny, train
    from qsched.cli.options import positive_int

    parser = _Parser(prog="qsched", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core). On a machine shared "
                             "with other jobs use fewer: oversubscribed threads can be 10x slower")
    # Accepted after the subcommand too; SUPPRESS keeps a top-level --debug from being reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (generate, calibrate, evaluate, quantize, train, families, tiny, study):
        module.add_parser(sub, parents=[common])
    return parser


def _quiet_third_party() -> None:
    """Keep the terminal for qsched's own progress bars and messages.

    Import-time notices of optional backends (torchao's CUDA extensions, torch's
    pytree registrations), transformers/diffusers warnings and their per-component
    loading bars say nothing a qsched user can act on; ``--debug`` keeps them.
    """
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torchmetrics' CLIP text path pads without truncation and transformers warns on every call
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0)
        return int(exit_.code or 0)
    if not args.debug:
        _quiet_third_party()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.run(args) or 0)
    except QSchedError as err:
        if args.debug:
            raise
        print(f"qsched {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qsched: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence, made readable
        if args.debug:
            raise
        print(
            f"qsched {args.command}: internal error: {type(err).__name__}: {err} "
            "(run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
