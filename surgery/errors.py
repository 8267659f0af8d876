"""Exceptions with messages written for people.

Every error a user can cause derives from :class:`UsageError` (the CLI exits with 2); failures
of the machine or the environment derive from :class:`RunError` (exit 1). Messages are one line
and name the file, tensor or recipe key at fault.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base of all weight-surgery errors."""

    exit_code = 1


class UsageError(SurgeryError):
    """The user's input is wrong: a path, a recipe key, a parameter, a model that does not fit."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint cannot be opened or is malformed (bad header, missing files, pickle)."""


class ShapeMismatchError(UsageError):
    """Inputs of one operation disagree on tensor names, shapes or dtypes."""


class RecipeError(UsageError):
    """A recipe is invalid; the message starts with the YAML location. ``key`` is the dotted
    recipe key at fault and ``detail`` the message without the location (for front ends that
    write the recipe themselves, such as ``surgery train``)."""

    key: str = ""
    detail: str = ""


class OutputExistsError(UsageError):
    """The output path exists and overwriting was not asked for, or it is an input."""


class DataError(UsageError):
    """A data file is missing or malformed; the message names the file and line."""


class HubError(UsageError):
    """A Hub repository cannot be reached or resolved."""


class RunError(SurgeryError):
    """A run failed for a reason outside the user's input (disk full, interrupted I/O)."""
