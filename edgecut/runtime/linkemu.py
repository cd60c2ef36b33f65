"""A userspace link emulator: a TCP relay that shapes each direction with a token bucket (rate,
burst) and a fixed one-way delay. This kernel has no netem, and shaping `lo` would slow every
loopback user on the machine, so tests, the demo and users try bandwidths through this instead.

Model: a direction is one link shared by all the relay's connections. A chunk of n bytes leaves
when the bucket allows (rate in bit/s; up to `burst` bytes may go at once after an idle spell)
and arrives `delay` seconds after its last bit left, so a message of B bytes takes
B*8/rate + delay one way, and a request/reply adds 2*delay of round trip. The relay buffers up to
`buffer` bytes per connection and direction (a router queue); beyond that it stops reading, and
TCP flow control pushes back on the sender.
"""
from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger("edgecut.runtime.linkemu")


class _Direction:
    def __init__(self, rate: float | None, delay: float, burst: int):
        self.rate, self.delay, self.burst = rate, delay, burst
        self.next_free = 0.0
        self.bytes = 0

    def schedule(self, now: float, n: int) -> float:
        """Arrival time of a chunk of `n` bytes handed to the link at `now`."""
        self.bytes += n
        if not self.rate:
            return now + self.delay
        start = max(self.next_free, now - self.burst * 8.0 / self.rate)
        self.next_free = start + n * 8.0 / self.rate
        return max(self.next_free, now) + self.delay


class LinkEmulator:
    """Relay `listen` -> `to`. `rate`/`delay` shape device->edge ("up"); `down_rate`/`down_delay`
    the way back (default: the same). Rates in bit/s (None: unlimited), delays in seconds.

    `start()` runs it on a background thread (tests); `serve_forever()` in the calling thread."""

    def __init__(self, listen=("127.0.0.1", 0), to=("127.0.0.1", 9000), *, rate: float | None = None,
                 delay: float = 0.0, down_rate: float | None = None, down_delay: float | None = None,
                 burst: int = 1500, chunk: int = 16 * 1024, buffer: int = 4 * 2**20):
        self.listen, self.to, self.chunk, self.buffer = tuple(listen), tuple(to), chunk, buffer
        self.up = _Direction(rate, delay, burst)
        self.down = _Direction(rate if down_rate is None else down_rate, delay if down_delay is None else down_delay,
                               burst)
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._relays: set = set()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.sockets[0].getsockname()[:2]

    def set_rate(self, up: float | None = None, down: float | None = None) -> None:
        """Change the rates while running (bit/s); `None` leaves a direction as it is."""
        def apply():
            if up is not None:
                self.up.rate = up
            if down is not None:
                self.down.rate = down
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(apply)
        else:
            apply()

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "LinkEmulator":
        self._thread = threading.Thread(target=self._run, daemon=True, name="edgecut-linkemu")
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._run()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # surfaced to start()
            self._error = e
            self._ready.set()
            if self._thread is None:
                raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._relay, *self.listen)
        log.info("link %s:%d -> %s:%d up %s delay %.1f ms, down %s delay %.1f ms", *self.address, *self.to,
                 _rate(self.up.rate), self.up.delay * 1e3, _rate(self.down.rate), self.down.delay * 1e3)
        self._ready.set()
        async with self._server:
            await self._stop.wait()
        relays = list(self._relays)       # end every open connection before the loop closes
        for t in relays:
            t.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    # ------------------------------------------------------------------------------ relaying
    async def _relay(self, c_reader, c_writer) -> None:
        self.connections += 1
        self._relays.add(asyncio.current_task())
        try:
            await self._relay_one(c_reader, c_writer)
        finally:
            self._relays.discard(asyncio.current_task())

    async def _relay_one(self, c_reader, c_writer) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.to)
        except OSError as e:
            log.warning("link: cannot reach %s:%d: %s", *self.to, e)
            c_writer.close()
            return
        tasks = [asyncio.ensure_future(self._pump(c_reader, s_writer, self.up)),
                 asyncio.ensure_future(self._pump(s_reader, c_writer, self.down))]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (c_writer, s_writer):
                w.close()

    async def _pump(self, reader, writer, d: _Direction) -> None:
        queue: asyncio.Queue = asyncio.Queue(max(1, self.buffer // self.chunk))
        loop = asyncio.get_running_loop()

        async def deliver():
            while True:
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                at, data = item
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        out = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(self.chunk)
                if not data:
                    break
                await queue.put((d.schedule(loop.time(), len(data)), data))
            await queue.put(None)
            await out
        except (OSError, asyncio.IncompleteReadError):
            out.cancel()
            raise
        finally:
            if not out.done():
                out.cancel()
                await asyncio.gather(out, return_exceptions=True)


def _rate(r: float | None) -> str:
    return "unlimited" if not r else f"{r / 1e6:.3g} Mbit/s"
