"""How the long, resumable jobs (dump, regenerate) end: a summary, or a message that says what to fix."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline.conversation import StrictModeError

Result = TypeVar("Result")


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


def run_long_job(job: Callable[[], Result], describe: Callable[[Result], str], out: Path, writing: str) -> None:
    """Run the job; the main process prints its summary. ``writing`` names the output in messages."""
    with exit_with_fix(out, writing):
        result = job()
    from accelerate import PartialState  # after the job: it set up the process group, if any

    if PartialState().is_main_process:
        print(describe(result))
