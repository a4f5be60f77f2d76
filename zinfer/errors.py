"""Errors a user can cause and fix; the CLI prints their message on one line and exits 2."""


class ZinferError(Exception):
    """Base of every user-facing error."""


class ModelNotFoundError(ZinferError, FileNotFoundError):
    pass


class CheckpointError(ZinferError, ValueError):
    """Missing, truncated or mis-shaped weights."""


class UnsupportedModelError(ZinferError, ValueError):
    pass


class InputError(ZinferError, ValueError):
    """Bad prompts or generation parameters."""
