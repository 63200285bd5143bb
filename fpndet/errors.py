"""User-facing errors.

Every problem caused by the user's input (a corrupt image, a malformed annotation file, an
unknown class, a box outside the image, a truncated checkpoint) is raised as an
:class:`InputError` whose message names the offending file. The CLI prints that one message and
exits with status 2 (no traceback unless ``--debug``).
"""
from __future__ import annotations

import os


class FpnDetError(Exception):
    """Base class of the errors fpndet raises on purpose."""


class InputError(FpnDetError):
    """Bad input from the user, naming the file it came from.

    Args:
        path: the file (or folder) at fault.
        problem: what is wrong, in one sentence.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None):
        if problem is None:
            # Rebuilt by torch's DataLoader from a worker's text ("Caught InputError in DataLoader
            # worker ... Original Traceback ... fpndet.errors.InputError: <message>"): keep the message.
            text = str(path).strip()
            last = text.splitlines()[-1] if text else ""
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            self.path, self.problem = None, last[len(prefix):] if last.startswith(prefix) else text
            super().__init__(self.problem)
            return
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class OutputError(FpnDetError):
    """A file fpndet must write cannot be written (disk full, no permission, ...), naming the
    file; the previous version of the file is left intact.

    Args:
        path: the file that could not be written.
        problem: what went wrong (the operating system's words).
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: cannot write: {problem}; the previous file is intact")


class TrainingDiverged(FpnDetError):
    """A loss became NaN or infinite; the message names the step."""


class InputWarning(UserWarning):
    """A problem with the user's input that fpndet worked around (a box clipped or dropped, a
    file skipped), naming the file. The CLI prints it as ``warning: <file>: <what>`` and counts
    repeats of the same ``what`` instead of printing each.

    Args:
        path: the file at fault.
        what: what was wrong and what was done, in a few words.
        kind: the same for every warning of this sort (what repeats are grouped by); default ``what``.
    """

    def __init__(self, path: str | os.PathLike | None, what: str, kind: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.what = what
        self.kind = kind or what
        super().__init__(what if self.path is None else f"{self.path}: {what}")
