"""How the long jobs' stages turn errors a user can fix into a message that says what to fix."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.conversation import StrictModeError


@contextmanager
def exit_with_fix(out: Path, writing: str) -> Iterator[None]:
    """Exit with a message (no traceback) on --strict failures, missing inputs and unwritable outputs."""
    try:
        yield
    except StrictModeError as err:
        sys.exit(f"{err}\nFix or remove the sample, or drop --strict to skip bad samples; re-run to resume.")
    except FileNotFoundError as err:
        sys.exit(str(err))
    except OSError as err:
        sys.exit(
            f"cannot write {writing} {out}: {err}\n"
            "Free disk space (or fix permissions) and re-run the same command: it resumes."
        )
