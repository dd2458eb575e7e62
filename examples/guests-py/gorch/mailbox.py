"""This routine's own mailbox, and other routines' mailboxes by name."""

import json

from wit_world.imports import mailbox as _mailbox

from ._errors import Cancelled, Closed, Codec, call, millis


def recv() -> bytes:
    """Waits for the next message without a time limit (raises `Cancelled` on stop)."""
    msg = call(_mailbox.recv, None)
    if msg is None:
        raise Closed("closed")
    return msg


def recv_timeout(seconds: float):
    """Waits up to `seconds` for the next message: bytes, or None if none came in time."""
    return call(_mailbox.recv, millis(seconds))


def recv_batch(max: int) -> list:
    """Waits for the next message, then takes up to `max` in all of what is queued (a list
    of bytes, never empty): one host call for the whole batch. The batch stays in flight
    until the next receive or a clean return; after a crash it is delivered again, one
    message per batch."""
    batch = call(_mailbox.recv_batch, max, None)
    if not batch:
        raise Closed("closed")
    return batch


def recv_batch_timeout(max: int, seconds: float) -> list:
    """Like `recv_batch`, waiting up to `seconds` for the first message: an empty list if
    none came in time."""
    return call(_mailbox.recv_batch, max, millis(seconds))


def batched(max: int):
    """The mailbox's messages one by one, received `max` at a time (`recv_batch`); ends when
    the routine is asked to stop:

        for msg in mailbox.batched(64):
            bus.publish("out", msg)
    """
    return _batched(lambda: recv_batch(max))


def _batched(take):
    while True:
        try:
            batch = take()
        except Cancelled:
            return
        yield from batch


def send(to: str, payload) -> None:
    """Delivers `payload` (bytes or str) to the routine named `to`, waiting while it is full."""
    if isinstance(payload, str):
        payload = payload.encode()
    call(_mailbox.send, to, bytes(payload))


def send_json(to: str, value) -> None:
    """Sends a value encoded as JSON."""
    try:
        data = json.dumps(value).encode()
    except (TypeError, ValueError) as e:
        raise Codec(str(e)) from None
    send(to, data)


def _decode(data):
    try:
        return json.loads(data)
    except ValueError as e:
        raise Codec(str(e)) from None


def recv_json():
    """Receives a message and decodes it from JSON."""
    return _decode(recv())


def recv_timeout_json(seconds: float):
    """Like `recv_timeout`, decoded from JSON (None if no message came in time)."""
    data = recv_timeout(seconds)
    return None if data is None else _decode(data)
