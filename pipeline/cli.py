"""Shared command-line plumbing: the error guard and the CONFIG argument."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

import pydantic

from pipeline.config import RunConfig, load_json
from pipeline.errors import EXIT_USAGE, UserError, describe_validation_error

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ESTALE}


def run_command(script: str, doc: str, json_help: str) -> tuple[RunConfig, argparse.Namespace]:
    """Parse `python pipeline/SCRIPT.py CONFIG [--json]` and load the config."""
    parser = argparse.ArgumentParser(
        prog=f"python pipeline/{script}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="the run's config JSON (the one given to predict.py)")
    parser.add_argument("--json", action="store_true", help=json_help)
    args = parser.parse_args()
    return RunConfig(**load_json(args.config)), args


def cli_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        print(f"affseg: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except pydantic.ValidationError as e:
        print(f"affseg: error: {describe_validation_error(e)}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as e:
        # the machine's state, not a bug: a full disk, a read-only or
        # vanished file system, a permission; anything else is a bug
        # and keeps its traceback
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"affseg: error: {e.filename + ': ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code or 0)
