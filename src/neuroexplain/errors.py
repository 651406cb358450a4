"""User-facing errors.

Every problem a user can fix (bad file, bad option, bad config) is raised as an
:class:`InputError`. The command line prints it as one line naming the file and the problem and
exits with a non-zero code; the traceback is only shown with ``neuroexplain --debug``.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["InputError", "NeuroexplainError"]


class NeuroexplainError(Exception):
    """Base class of the errors neuroexplain reports to the user without a traceback."""

    exit_code = 2


class InputError(NeuroexplainError):
    """A problem with an input file, option or configuration value.

    Args:
        path: the file (or option / config key) the problem is in; ``None`` when there is none.
        problem: what is wrong, phrased as "expected X, got Y" where possible.

    Example:
        >>> str(InputError("sub-01_T1w.nii.gz", "expected a 3D volume, got shape (4, 4)"))
        'sub-01_T1w.nii.gz: expected a 3D volume, got shape (4, 4)'
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")
