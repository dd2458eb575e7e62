// Write gorch-host workers in JavaScript: the names of the Rust SDK (`gorch-guest-sdk`), in
// JavaScript's camelCase. A worker module exports `run` (the world's export), made from a
// plain function by `worker(main)`:
//
//   import * as gorch from './gorch.js';
//   const { mailbox, bus } = gorch;
//   export const run = gorch.worker(() => {
//     for (;;) {
//       gorch.beat();
//       bus.publish('greetings', mailbox.recv()); // throws gorch.Cancelled on stop
//     }
//   });
//
// Every blocking call (mailbox.recv, mailbox.send, bus.publish, bus.recv, sleep) throws
// `Cancelled` (`sleep` returns false) once the host asks the routine to stop; `worker`
// turns an uncaught `Cancelled` into a clean return. Timeouts are milliseconds; payloads
// are Uint8Array (a string is sent as UTF-8).

import * as runtime from 'gorch:worker/runtime@0.1.0';
import * as wmailbox from 'gorch:worker/mailbox@0.1.0';
import * as wbus from 'gorch:worker/bus@0.1.0';

/** Why a host call did not complete (the Rust SDK's `Error`). */
export class GorchError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}
/** The routine is being stopped: return from the worker promptly. */
export class Cancelled extends GorchError {}
/** The mailbox or topic is closed and empty. */
export class Closed extends GorchError {}
/** No live routine has this name. */
export class NoSuchRoutine extends GorchError {}
/** The payload is larger than the per-message limit (`limit` bytes). */
export class TooLarge extends GorchError {
  constructor(limit) {
    super(`payload too large (limit ${limit} bytes)`);
    this.limit = limit;
  }
}
/** A host limit was reached (for example the number of topics). */
export class Limit extends GorchError {}
/** The topic or routine name is not valid. */
export class InvalidName extends GorchError {}
/** The call left the host and no answer came: the message may or may not be delivered. */
export class OutcomeUnknown extends GorchError {}
/** A JSON helper could not encode or decode a message. */
export class Codec extends GorchError {}

function convert(e) {
  const v = e && e.payload;
  if (!v || typeof v.tag !== 'string') return e;
  switch (v.tag) {
    case 'cancelled': return new Cancelled('cancelled');
    case 'closed': return new Closed('closed');
    case 'no-such-routine': return new NoSuchRoutine(v.val);
    case 'too-large': return new TooLarge(Number(v.val));
    case 'limit': return new Limit(v.val);
    case 'invalid-name': return new InvalidName(v.val);
    case 'outcome-unknown': return new OutcomeUnknown(v.val);
    default: return new GorchError(v.tag);
  }
}

function call(f, ...args) {
  try {
    return f(...args);
  } catch (e) {
    throw convert(e);
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const bytes = (p) => (typeof p === 'string' ? encoder.encode(p) : p);
const millis = (ms) => (ms === undefined || ms === null ? undefined : BigInt(Math.max(0, Math.floor(ms))));

function toJson(value) {
  try {
    return encoder.encode(JSON.stringify(value));
  } catch (e) {
    throw new Codec(String(e));
  }
}

function fromJson(data) {
  try {
    return JSON.parse(decoder.decode(data));
  } catch (e) {
    throw new Codec(String(e));
  }
}

/** Heartbeat: resets the host's idle-timeout watchdog for this routine. */
export const beat = () => runtime.beat();
/** Adds busy time (milliseconds) that the host cannot observe itself. */
export const addBusy = (ms) => runtime.addBusy(BigInt(Math.max(0, Math.floor(ms * 1e6))));
/** The routine's id (unchanged across restarts), a BigInt. */
export const id = () => runtime.id();
/** The routine's name (for replicas: `plugin-1`, `plugin-2`, ...). */
export const name = () => runtime.name();
/** How many times the supervisor has restarted this routine. */
export const restarts = () => Number(runtime.restarts());
/** True once the host has asked this routine to stop. */
export const cancelled = () => runtime.cancelled();
/** Sleeps without using fuel; false if cut short by cancellation. */
export const sleep = (ms) => runtime.sleep(millis(ms));
/** A log line attributed to this routine; `level` is trace, debug, info, warn or error. */
export const log = (level, message) => runtime.log(level, String(message));
export const trace = (m) => log('trace', m);
export const debug = (m) => log('debug', m);
export const info = (m) => log('info', m);
export const warn = (m) => log('warn', m);
export const error = (m) => log('error', m);
/** Decodes a UTF-8 payload. */
export const text = (data) => decoder.decode(data);

/** This routine's own mailbox, and other routines' mailboxes by name. */
export const mailbox = {
  /** Waits for the next message without a time limit. */
  recv() {
    const m = call(wmailbox.recv, undefined);
    if (m === undefined) throw new Closed('closed');
    return m;
  },
  /** Waits up to `ms` milliseconds: the message, or undefined if none came in time. */
  recvTimeout(ms) {
    return call(wmailbox.recv, millis(ms));
  },
  /**
   * Waits for the next message, then takes up to `max` in all of what is queued (an array of
   * Uint8Array, never empty): one host call for the whole batch. The batch stays in flight
   * until the next receive or a clean return; after a crash it is delivered again, one
   * message per batch.
   */
  recvBatch(max) {
    const b = call(wmailbox.recvBatch, max, undefined);
    if (b.length === 0) throw new Closed('closed');
    return b;
  },
  /** Like recvBatch, waiting up to `ms` for the first message: an empty array if none came. */
  recvBatchTimeout(max, ms) {
    return call(wmailbox.recvBatch, max, millis(ms));
  },
  /**
   * The mailbox's messages one by one, received `max` at a time; ends when the routine is
   * asked to stop: `for (const msg of mailbox.batched(64)) bus.publish('out', msg);`
   */
  batched(max) {
    return batched(() => this.recvBatch(max));
  },
  /** Delivers `payload` to the routine named `to`, waiting while its mailbox is full. */
  send(to, payload) {
    call(wmailbox.send, to, bytes(payload));
  },
  sendJson(to, value) {
    this.send(to, toJson(value));
  },
  recvJson() {
    return fromJson(this.recv());
  },
  recvTimeoutJson(ms) {
    const m = this.recvTimeout(ms);
    return m === undefined ? undefined : fromJson(m);
  },
};

/** Named topics shared by all routines, created on first use (each message goes to one
 * receiver). */
export const bus = {
  /** Publishes `payload` on `topic`, waiting while the topic is full. */
  publish(topic, payload) {
    call(wbus.publish, topic, bytes(payload));
  },
  /** Waits for the next message on `topic` without a time limit. */
  recv(topic) {
    const m = call(wbus.recv, topic, undefined);
    if (m === undefined) throw new Closed('closed');
    return m;
  },
  /** Waits up to `ms` milliseconds for a message on `topic`: it, or undefined. */
  recvTimeout(topic, ms) {
    return call(wbus.recv, topic, millis(ms));
  },
  /**
   * Waits for the next message on `topic`, then takes up to `max` in all of what is queued
   * there (never empty); acknowledged like mailbox.recvBatch.
   */
  recvBatch(topic, max) {
    const b = call(wbus.recvBatch, topic, max, undefined);
    if (b.length === 0) throw new Closed('closed');
    return b;
  },
  /** Like recvBatch, waiting up to `ms` for the first message: an empty array if none came. */
  recvBatchTimeout(topic, max, ms) {
    return call(wbus.recvBatch, topic, max, millis(ms));
  },
  /** The messages of `topic` one by one, `max` at a time; ends when the routine is asked to stop. */
  batched(topic, max) {
    return batched(() => this.recvBatch(topic, max));
  },
  /**
   * Publishes the payloads (Uint8Array or string) in order with one host call, waiting while
   * the topic is full. Nothing is published if one is over the size limit (TooLarge); after
   * another error, those before it were published.
   */
  publishBatch(topic, payloads) {
    call(wbus.publishBatch, topic, Array.from(payloads, bytes));
  },
  publishJson(topic, value) {
    this.publish(topic, toJson(value));
  },
  recvJson(topic) {
    return fromJson(this.recv(topic));
  },
  recvTimeoutJson(topic, ms) {
    const m = this.recvTimeout(topic, ms);
    return m === undefined ? undefined : fromJson(m);
  },
};

function* batched(take) {
  for (;;) {
    let batch;
    try {
      batch = take();
    } catch (e) {
      if (e instanceof Cancelled) return;
      throw e;
    }
    yield* batch;
  }
}

/**
 * The world's `run` export, running `main()`: returning (or throwing `Cancelled`) ends the
 * routine as STOPPED; throwing anything else ends it as FAILED with that as its last error.
 */
export function worker(main) {
  return function run() {
    try {
      main();
    } catch (e) {
      if (e instanceof Cancelled) return;
      throw e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    }
  };
}
