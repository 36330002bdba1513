"""One clear sentence instead of a traceback for every mistake a user can make."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a UserError prints `error: <sentence>` and exits 2."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
