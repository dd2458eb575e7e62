"""An echo worker in Python: says hello on the `hello` topic (JSON), then republishes every
message of its mailbox on the `echo-py` topic, beating while it waits."""

import gorch
from gorch import bus, mailbox


def main():
    gorch.info(f"{gorch.name()} starting (python, restarts: {gorch.restarts()})")
    bus.publish_json("hello", {"worker": gorch.name(), "lang": "python"})
    echoed = 0
    while True:
        gorch.beat()  # resets the idle watchdog
        msg = mailbox.recv_timeout(1.0)  # raises gorch.Cancelled when the host stops us
        if msg is None:
            continue
        bus.publish("echo-py", msg)
        echoed += 1
        if echoed == 1:
            gorch.info(f"first message echoed: {len(msg)} bytes")


WitWorld = gorch.worker(main)
