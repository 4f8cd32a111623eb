"""The service's entry point: Hypercorn, configured by `hypercorn.toml`, with draining on SIGTERM.

`python -m serve` is what `make run`, the container and the tests run. It serves through Hypercorn's
own `serve()` API with a shutdown trigger of ours: the `hypercorn` command's SIGTERM handler stops
the server without telling the app, so live calls could not be drained. On SIGTERM or Ctrl-C the app
drains (see `lifecycle.py`), then Hypercorn closes the listeners and the lifespan shuts down; exit 0.
A second signal skips the rest of the drain time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config

from lifecycle import Lifecycle
from settings import PROJECT_DIR, Settings

try:  # libuv's event loop: measured less CPU per chunk and a third of the memory per session
    import uvloop
except ImportError:  # not on every platform
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger("serve")


def hypercorn_config(settings: Settings) -> Config:
    config = Config.from_toml(PROJECT_DIR / "hypercorn.toml")
    config.bind = [f"{settings.host}:{settings.port}"]
    config.workers = 1  # one process per instance; scale with instances, not workers
    return config


async def wait_for_stop_signal_then_drain(lifecycle: Lifecycle) -> None:
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[signal.Signals]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    received = await signals.get()
    log.info("%s received", received.name)
    drain = asyncio.create_task(lifecycle.drain())
    hurry = asyncio.create_task(signals.get())
    await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.info("second signal: closing live sessions now")
        lifecycle.stopping.set()
        await drain
    hurry.cancel()


def main() -> None:
    from app import app  # built once, from the environment; exits with one line if misconfigured

    settings: Settings = app.state.settings
    lifecycle: Lifecycle = app.state.lifecycle
    # What start-up built (modules, the SDK's schemas, the app) lives as long as the process: keep it
    # out of the cyclic GC, whose full collections otherwise walk it all with the event loop stopped
    # (50-75 ms measured under load: every live call hears the gap).
    gc.collect()
    gc.freeze()
    run = uvloop.run if uvloop is not None else asyncio.run
    log.info("event loop: %s", "uvloop" if uvloop is not None else "asyncio")
    run(
        serve(
            app,  # type: ignore[arg-type]
            hypercorn_config(settings),
            shutdown_trigger=lambda: wait_for_stop_signal_then_drain(lifecycle),
        )
    )


if __name__ == "__main__":
    main()
