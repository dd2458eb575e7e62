"""An echo worker in Python: says hello on the `hello` topic (JSON), then republishes every
message of its mailbox on the `echo-py` topic, beating while it waits. It takes what the
mailbox holds in batches (one host call each) and republishes each batch with one call."""

import gorch
from gorch import bus, mailbox


def main():
    gorch.info(f"{gorch.name()} starting (python, restarts: {gorch.restarts()})")
    bus.publish_json("hello", {"worker": gorch.name(), "lang": "python"})
    echoed = 0
    while True:
        gorch.beat()  # resets the idle watchdog
        # Up to 64 queued messages, waiting up to a second for the first (an empty list
        # then); raises gorch.Cancelled when the host stops us.
        batch = mailbox.recv_batch_timeout(64, 1.0)
        if not batch:
            continue
        bus.publish_batch("echo-py", batch)
        if echoed == 0:
            gorch.info(f"first message echoed: {len(batch[0])} bytes")
        echoed += len(batch)


WitWorld = gorch.worker(main)
