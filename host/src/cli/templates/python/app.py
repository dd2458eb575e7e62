"""{{name}}: a gorch-host worker. Logs and republishes, as JSON on the `greetings` topic,
every message sent to its mailbox; beats while it waits."""

import gorch
from gorch import bus, mailbox


def main():
    gorch.info(f"{gorch.name()} starting (restarts: {gorch.restarts()})")
    count = 0
    while True:
        gorch.beat()  # resets the idle watchdog
        msg = mailbox.recv_timeout(1.0)  # raises gorch.Cancelled when the host stops us
        if msg is None:
            continue  # nothing within a second: beat again
        count += 1
        text = msg.decode(errors="replace")
        gorch.info(f"message {count}: {text}")
        bus.publish_json("greetings", {"from": gorch.name(), "text": text, "count": count})


WitWorld = gorch.worker(main)
