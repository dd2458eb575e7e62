// An echo worker in JavaScript: says hello on the `hello` topic (JSON), then republishes
// every message of its mailbox on the `echo-js` topic, beating while it waits. It takes what
// the mailbox holds in batches (one host call each) and republishes each batch with one call.
import * as gorch from './gorch.js';

const { mailbox, bus } = gorch;

export const run = gorch.worker(() => {
  gorch.info(`${gorch.name()} starting (javascript, restarts: ${gorch.restarts()})`);
  bus.publishJson('hello', { worker: gorch.name(), lang: 'javascript' });
  let echoed = 0;
  for (;;) {
    gorch.beat(); // resets the idle watchdog
    // Up to 64 queued messages, waiting up to a second for the first (an empty array then);
    // throws gorch.Cancelled when the host stops us.
    const batch = mailbox.recvBatchTimeout(64, 1000);
    if (batch.length === 0) continue;
    bus.publishBatch('echo-js', batch);
    if (echoed === 0) gorch.info(`first message echoed: ${batch[0].length} bytes`);
    echoed += batch.length;
  }
});
