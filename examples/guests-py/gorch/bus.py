"""Named topics shared by all routines, created on first use (each message goes to one
receiver)."""

import json

from wit_world.imports import bus as _bus

from ._errors import Closed, Codec, call, millis
from .mailbox import _batched, _decode


def publish(topic: str, payload) -> None:
    """Publishes `payload` (bytes or str) on `topic`, waiting while the topic is full."""
    if isinstance(payload, str):
        payload = payload.encode()
    call(_bus.publish, topic, bytes(payload))


def recv(topic: str) -> bytes:
    """Waits for the next message on `topic` without a time limit."""
    msg = call(_bus.recv, topic, None)
    if msg is None:
        raise Closed("closed")
    return msg


def recv_timeout(topic: str, seconds: float):
    """Waits up to `seconds` for the next message on `topic`: bytes, or None."""
    return call(_bus.recv, topic, millis(seconds))


def recv_batch(topic: str, max: int) -> list:
    """Waits for the next message on `topic`, then takes up to `max` in all of what is queued
    there (a list of bytes, never empty); acknowledged like `mailbox.recv_batch`."""
    batch = call(_bus.recv_batch, topic, max, None)
    if not batch:
        raise Closed("closed")
    return batch


def recv_batch_timeout(topic: str, max: int, seconds: float) -> list:
    """Like `recv_batch`, waiting up to `seconds` for the first message: an empty list if
    none came in time."""
    return call(_bus.recv_batch, topic, max, millis(seconds))


def batched(topic: str, max: int):
    """The messages of `topic` one by one, received `max` at a time; ends when the routine
    is asked to stop (see `mailbox.batched`)."""
    return _batched(lambda: recv_batch(topic, max))


def publish_batch(topic: str, payloads) -> None:
    """Publishes the payloads (bytes or str) in order with one host call, waiting while the
    topic is full. Nothing is published if one is over the size limit (`TooLarge`); after
    another error, those before it were published."""
    data = [p.encode() if isinstance(p, str) else bytes(p) for p in payloads]
    call(_bus.publish_batch, topic, data)


def publish_json(topic: str, value) -> None:
    """Publishes a value encoded as JSON."""
    try:
        data = json.dumps(value).encode()
    except (TypeError, ValueError) as e:
        raise Codec(str(e)) from None
    publish(topic, data)


def recv_json(topic: str):
    """Receives a message from `topic` and decodes it from JSON."""
    return _decode(recv(topic))


def recv_timeout_json(topic: str, seconds: float):
    """Like `recv_timeout`, decoded from JSON (None if no message came in time)."""
    data = recv_timeout(topic, seconds)
    return None if data is None else _decode(data)
