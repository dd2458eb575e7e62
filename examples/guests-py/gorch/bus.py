"""Named topics shared by all routines, created on first use (each message goes to one
receiver)."""

import json

from wit_world.imports import bus as _bus

from ._errors import Closed, Codec, call, millis
from .mailbox import _decode


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
