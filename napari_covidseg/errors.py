"""Exceptions that carry a message meant for the user (GUI notification or CLI error).

Every error a user can cause by giving bad input derives from :class:`CovidsegError`; the GUI
shows ``str(error)`` in a napari notification and the CLI prints it and exits non-zero.  The
message says what is wrong *and* what to do about it.
"""


class CovidsegError(Exception):
    """Base class of errors whose message is shown to the user as is."""


class InputError(CovidsegError):
    """A file or array given by the user cannot be used (wrong format, shape or values)."""


class CheckpointError(CovidsegError):
    """A checkpoint file is corrupt, of an unknown format, or for another network."""


class DataFolderError(CovidsegError):
    """A training data folder is empty, incomplete or inconsistent."""


class CancelledError(CovidsegError):
    """Long work was cancelled by the user."""
