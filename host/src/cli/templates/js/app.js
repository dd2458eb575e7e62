// {{name}}: a gorch-host worker. Logs and republishes, as JSON on the `greetings` topic,
// every message sent to its mailbox; beats while it waits.
import * as gorch from './gorch.js';

const { mailbox, bus } = gorch;

export const run = gorch.worker(() => {
  gorch.info(`${gorch.name()} starting (restarts: ${gorch.restarts()})`);
  let count = 0;
  for (;;) {
    gorch.beat(); // resets the idle watchdog
    const msg = mailbox.recvTimeout(1000); // throws gorch.Cancelled when the host stops us
    if (msg === undefined) continue; // nothing within a second: beat again
    count += 1;
    const text = gorch.text(msg);
    gorch.info(`message ${count}: ${text}`);
    bus.publishJson('greetings', { from: gorch.name(), text, count });
  }
});
