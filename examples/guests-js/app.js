// An echo worker in JavaScript: says hello on the `hello` topic (JSON), then republishes
// every message of its mailbox on the `echo-js` topic, beating while it waits.
import * as gorch from './gorch.js';

const { mailbox, bus } = gorch;

export const run = gorch.worker(() => {
  gorch.info(`${gorch.name()} starting (javascript, restarts: ${gorch.restarts()})`);
  bus.publishJson('hello', { worker: gorch.name(), lang: 'javascript' });
  let echoed = 0;
  for (;;) {
    gorch.beat(); // resets the idle watchdog
    const msg = mailbox.recvTimeout(1000); // throws gorch.Cancelled when the host stops us
    if (msg === undefined) continue;
    bus.publish('echo-js', msg);
    if (++echoed === 1) gorch.info(`first message echoed: ${msg.length} bytes`);
  }
});
