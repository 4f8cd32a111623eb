"""A lean WebSocket client for the load generator: websockets' own sans-I/O protocol on an asyncio Protocol.

The asyncio client of websockets costs a task switch and a future per message; at 200 callers x 50
frames/s x 2 directions that alone would fill the load generator's core and the figures would measure
the generator. Here a send is `protocol.send_binary()` + `transport.write()`, and a received message is
handled in `data_received`, synchronously. The handshake, masking, and permessage-deflate are the
library's: `deflate=True` offers exactly what `websockets.connect(compression="deflate")` offers (and a
browser offers: `permessage-deflate; client_max_window_bits`).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import struct
import time
import zlib
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Opcode

OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT = Opcode.BINARY, Opcode.CLOSE, Opcode.CONT, Opcode.TEXT
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension ships with websockets wheels
    from websockets.utils import apply_mask

OnMessage = Callable[[bytes, float], None]  # (message, time.perf_counter() at its arrival)


class WSClient(asyncio.Protocol):
    """One WebSocket connection; `on_message(data, loop_time)` is called for every complete message."""

    def __init__(self, uri: str, *, deflate: bool, on_message: OnMessage) -> None:
        self._loop = asyncio.get_running_loop()
        extensions = enable_client_permessage_deflate(None) if deflate else None
        self.protocol = ClientProtocol(parse_uri(uri), extensions=extensions, max_size=2**22)
        self.transport: asyncio.Transport | None = None
        self.on_message = on_message
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.extensions = ""
        self._parts: list[bytes] = []
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        self._time = time.perf_counter

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = self._time()
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                if protocol.handshake_exc is not None:
                    if not self.opened.done():
                        self.opened.set_exception(protocol.handshake_exc)
                else:
                    self.extensions = event.headers.get("Sec-WebSocket-Extensions", "")
                    if not self.opened.done():
                        self.opened.set_result(None)
                continue
            opcode = event.opcode
            if opcode is OP_BINARY or opcode is OP_TEXT or opcode is OP_CONT:
                if event.fin and not self._parts:
                    self.on_message(event.data, now)  # type: ignore[arg-type]
                else:
                    self._parts.append(bytes(event.data))
                    if event.fin:
                        whole, self._parts = b"".join(self._parts), []
                        self.on_message(whole, now)
            elif opcode is OP_CLOSE and protocol.close_rcvd is not None:
                self.close_code = protocol.close_rcvd.code
                self.close_reason = protocol.close_rcvd.reason
        self._flush()  # pongs, close replies

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("connection lost during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    # sending

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()  # TLS cannot half-close

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN and self.transport is not None

    @property
    def deflate_negotiated(self) -> bool:
        return "permessage-deflate" in self.extensions

    def send_binary(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        self._flush()

    def send_text(self, data: bytes) -> None:
        self.protocol.send_text(data)
        self._flush()

    def send_frame(self, payload: bytes, *, binary: bool = True, compressed: bool = False) -> None:
        """Write one whole client message, masked, bypassing the protocol's own encoder.

        `compressed=True` means `payload` is already a permessage-deflate body (RFC 7692: raw deflate,
        the final `00 00 ff ff` removed) and sets RSV1. Only ever used for data frames; control frames
        (pong, close) still come from the protocol object, which never compresses them.
        """
        n = len(payload)
        first = (0x80 | 0x40 if compressed else 0x80) | (0x2 if binary else 0x1)
        if n < 126:
            header = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, n)
        mask = random.getrandbits(32).to_bytes(4, "little")
        transport = self.transport
        assert transport is not None
        transport.write(header + mask + apply_mask(payload, mask))

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def close(self, timeout: float = 2.0) -> None:
        """Close handshake, bounded by `timeout`; then the transport is closed whatever happened."""
        if self.transport is None:
            return
        try:
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(1000, "bench round over")
                self._flush()
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.lost)
        except (TimeoutError, Exception):
            pass
        finally:
            self.transport.abort() if not self.transport.is_closing() else None


def deflate_body(body: bytes) -> bytes:
    """`body` as a permessage-deflate message body of its own (zlib level 6, like a browser).

    A browser compresses every message (level 6, context takeover): ~70 us per 20 ms of PCM, which at
    200 callers would cost the load generator a third of its core and say nothing about the server.
    What the server has to do, inflate a real deflate stream, is kept: each message is a stored block
    holding the tag (`stored_block`), then its body compressed on its own by zlib, so that it refers to
    nothing before it, which any inflater accepts, with or without context takeover. Bodies repeat
    across callers and rounds, so the generator compresses each one once.
    """
    c = zlib.compressobj(6, zlib.DEFLATED, -15, 8)
    out = c.compress(body) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def stored_block(data: bytes) -> bytes:
    """A non-final stored deflate block holding `data` (< 64 KiB), byte-aligned at both ends."""
    n = len(data)
    return b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF) + data


async def connect(
    uri: str,
    *,
    deflate: bool,
    on_message: OnMessage,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> WSClient:
    """Open the TCP (or TLS) connection and complete the WebSocket handshake within `timeout`."""
    loop = asyncio.get_running_loop()
    wsuri = parse_uri(uri)
    client: WSClient | None = None

    def factory() -> WSClient:
        nonlocal client
        client = WSClient(uri, deflate=deflate, on_message=on_message)
        return client

    async with asyncio.timeout(timeout):
        await loop.create_connection(
            factory,
            wsuri.host,
            wsuri.port,
            ssl=ssl_context,
            server_hostname=wsuri.host if ssl_context is not None else None,
        )
        assert client is not None
        try:
            await client.opened
        except BaseException:
            if client.transport is not None:
                client.transport.abort()
            raise
    return client
