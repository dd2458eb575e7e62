"""The WIT `error` variant as Python exceptions (the Rust SDK's `Error`)."""

from componentize_py_types import Err
from wit_world.imports import types as _types


class Error(Exception):
    """Why a host call did not complete."""


class Cancelled(Error):
    """The routine is being stopped: return from the worker promptly."""


class Closed(Error):
    """The mailbox or topic is closed and empty."""


class NoSuchRoutine(Error):
    """No live routine has this name."""


class TooLarge(Error):
    """The payload is larger than the per-message limit (`limit` bytes)."""

    def __init__(self, limit: int):
        super().__init__(f"payload too large (limit {limit} bytes)")
        self.limit = limit


class Limit(Error):
    """A host limit was reached (for example the number of topics)."""


class InvalidName(Error):
    """The topic or routine name is not valid."""


class OutcomeUnknown(Error):
    """The call left the host and no answer came: the message may or may not be delivered."""


class Codec(Error):
    """A JSON helper could not encode or decode a message."""


def convert(err: Err) -> Error:
    """The exception for a host call's `Err(types.Error)`."""
    v = err.value
    if isinstance(v, _types.Error_Cancelled):
        return Cancelled("cancelled")
    if isinstance(v, _types.Error_Closed):
        return Closed("closed")
    if isinstance(v, _types.Error_NoSuchRoutine):
        return NoSuchRoutine(v.value)
    if isinstance(v, _types.Error_TooLarge):
        return TooLarge(v.value)
    if isinstance(v, _types.Error_Limit):
        return Limit(v.value)
    if isinstance(v, _types.Error_InvalidName):
        return InvalidName(v.value)
    if isinstance(v, _types.Error_OutcomeUnknown):
        return OutcomeUnknown(v.value)
    return Error(repr(v))


def call(f, *args):
    """Calls a host import, raising `Error` subclasses instead of `Err`."""
    try:
        return f(*args)
    except Err as e:
        raise convert(e) from None


def millis(seconds):
    """A timeout in seconds as the host's milliseconds (None: wait without limit)."""
    return None if seconds is None else max(0, int(seconds * 1000))
