"""The ``sc-steer`` command line: parse arguments, call the library, say where results went.

Problems with the user's input (``ScSteerError``) print one ``error:`` line and exit with status 2.
``parser.py`` defines the commands and their flags, ``commands.py`` what each does.
"""
from __future__ import annotations

import os
import sys

from ..errors import ScSteerError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    from .. import distributed

    args = build_parser().parse_args(argv)
    where = f"[rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}] " if distributed.launched() else ""
    finished = False
    try:
        args.func(args)
        finished = True
    except ScSteerError as e:
        print(f"{where}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}interrupted: progress was checkpointed; rerun the same command (train: add --resume) to "
              "continue", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(finished)
    return 0

