"""How stages end: a summary, or a message that says what to fix (never a traceback for a user's mistake)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline.errors import PipelineError, StrictModeError

Result = TypeVar("Result")

# How torch's DataLoader re-raises a worker's exception in the main process: a new exception of the same type whose
# text is "Caught <type> in DataLoader worker process <n>.\nOriginal Traceback (most recent call last): ...".
WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


@contextmanager
def user_errors(out: Path | None = None, writing: str = "the output") -> Iterator[None]:
    """Exit with the message of a ``PipelineError``; with ``out``, also on missing inputs and unwritable outputs."""
    try:
        yield
    except StrictModeError as err:
        sys.exit(f"{message(err)}\nFix or remove the sample, or drop --strict to skip bad samples; re-run to resume.")
    except PipelineError as err:
        sys.exit(message(err))
    except FileNotFoundError as err:
        if out is None:
            raise
        sys.exit(str(err))
    except OSError as err:
        if out is None:
            raise
        sys.exit(
            f"cannot write {writing} {out}: {err}\n"
            "Free disk space (or fix permissions) and re-run the same command: it resumes."
        )


def message(err: PipelineError) -> str:
    """The error's own message, also when a DataLoader worker raised it: the user sees what to fix, not the worker's
    traceback that torch wraps around it (the last line of which is ``module.Type: message``)."""
    text = str(err)
    if WORKER_TRACEBACK not in text:
        return text
    head = f"\n{type(err).__module__}.{type(err).__qualname__}: "
    at = text.rfind(head)
    return text[at + len(head) :].rstrip("\n") if at >= 0 else text


def run_long_job(job: Callable[[], Result], describe: Callable[[Result], str], out: Path, writing: str) -> None:
    """Run a resumable job (dump, regenerate); the main process prints its summary. ``writing`` names the output."""
    with user_errors(out, writing):
        result = job()
    from accelerate import PartialState  # after the job: it set up the process group, if any

    if PartialState().is_main_process:
        print(describe(result))
