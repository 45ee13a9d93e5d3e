"""What the user can fix: one base class, so the apps, the rank agreement and the docs need no list.

A :class:`UserError` is reported as one line (the message names the problem and the fix), exit code
1, no traceback. Raised on rank 0 inside a rank-0 decision, the same type with the same message is
raised on every other rank: subclasses register themselves by name when they are defined. The bottom
layer: imports nothing from fcmae.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the run's input (config, data, checkpoint, disk, run directory) that the
    message explains with its fix; never a bug of ours."""

    registry: dict[str, type["UserError"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        UserError.registry[cls.__name__] = cls


class ConfigError(UserError, ValueError):
    """Invalid configuration values; the message lists every problem and how to fix it."""


def user_error_type(name: str) -> type[UserError]:
    """The class of a user error by its name (as another rank sent it); the base class for a name
    no subclass has."""
    return UserError.registry.get(name, UserError)


def user_error(name: str, message: str) -> UserError:
    """The user error ``name`` with ``message``, as another rank raised it (its text is the whole of it:
    a constructor that takes more than the message is bypassed, its extras stay on the raising rank)."""
    cls = user_error_type(name)
    try:
        return cls(message)
    except TypeError:
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error
