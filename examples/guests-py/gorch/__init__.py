"""Write gorch-host workers in Python: the names of the Rust SDK (`gorch-guest-sdk`).

A worker is a module that defines `WitWorld` (what componentize-py exports as the world's
`run`); `gorch.worker(main)` makes one from a plain function:

    import gorch
    from gorch import bus, mailbox

    def main():
        gorch.info(f"{gorch.name()} starting")
        while True:
            gorch.beat()
            msg = mailbox.recv()          # raises gorch.Cancelled when the host stops us
            bus.publish("greetings", msg)

    WitWorld = gorch.worker(main)

Every blocking call (`mailbox.recv`, `mailbox.send`, `bus.publish`, `bus.recv`, `sleep`)
raises `Cancelled` (`sleep` returns False) once the host asks the routine to stop;
`gorch.worker` turns an uncaught `Cancelled` into a clean return. Timeouts are seconds.
"""

from wit_world.imports import runtime as _runtime

from ._errors import (
    Cancelled,
    Closed,
    Codec,
    Error,
    InvalidName,
    Limit,
    NoSuchRoutine,
    OutcomeUnknown,
    TooLarge,
)
from . import bus, mailbox

__all__ = [
    "Cancelled", "Closed", "Codec", "Error", "InvalidName", "Limit", "NoSuchRoutine",
    "OutcomeUnknown", "TooLarge", "Level", "add_busy", "beat", "bus", "cancelled", "debug",
    "error", "id", "info", "log", "mailbox", "name", "restarts", "sleep", "trace", "warn",
    "worker",
]

Level = _runtime.Level


def beat() -> None:
    """Heartbeat: resets the host's idle-timeout watchdog for this routine."""
    _runtime.beat()


def add_busy(seconds: float) -> None:
    """Adds busy time that the host cannot observe itself."""
    _runtime.add_busy(max(0, int(seconds * 1e9)))


def id() -> int:  # noqa: A001 (the Rust SDK's name)
    """The routine's id: unchanged across restarts."""
    return _runtime.id()


def name() -> str:
    """The routine's name (for replicas: `plugin-1`, `plugin-2`, ...)."""
    return _runtime.name()


def restarts() -> int:
    """How many times the supervisor has restarted this routine."""
    return _runtime.restarts()


def cancelled() -> bool:
    """True once the host has asked this routine to stop."""
    return _runtime.cancelled()


def sleep(seconds: float) -> bool:
    """Sleeps without using fuel; False if cut short by cancellation."""
    return _runtime.sleep(max(0, int(seconds * 1000)))


def log(level: Level, message: str) -> None:
    """A log line attributed to this routine."""
    _runtime.log(level, str(message))


def trace(message: str) -> None:
    """Logs at `trace` level."""
    log(Level.TRACE, message)


def debug(message: str) -> None:
    """Logs at `debug` level."""
    log(Level.DEBUG, message)


def info(message: str) -> None:
    """Logs at `info` level."""
    log(Level.INFO, message)


def warn(message: str) -> None:
    """Logs at `warn` level."""
    log(Level.WARN, message)


def error(message: str) -> None:
    """Logs at `error` level."""
    log(Level.ERROR, message)


def worker(main):
    """The `WitWorld` class componentize-py exports, running `main()` as the worker's `run`.

    `main` returning (or raising `Cancelled`) ends the routine as STOPPED; raising any other
    exception ends it as FAILED with the exception as its last error.
    """
    from componentize_py_types import Err

    class WitWorld:
        def run(self) -> None:
            try:
                main()
            except Cancelled:
                return
            except Exception as e:  # noqa: BLE001 (becomes the routine's last error)
                raise Err(f"{type(e).__name__}: {e}") from e

    return WitWorld
