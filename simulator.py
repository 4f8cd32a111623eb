"""Local stand-in for Gemini Live: a TLS WebSocket server speaking BidiGenerateContent.

Owns a throwaway CA (trustme, made at start), the serving socket and the per-connection protocol, so
the unchanged google-genai SDK can connect: ``base_url=sim.url``, and ``SSL_CERT_FILE=sim.ca_file``
set before the ``genai.Client`` is made. Modes:
* ``script``: records the client and answers only through the ``SimSession.send_*`` calls.
* ``echo``: energy VAD; each caller utterance comes back resampled to 24 kHz at ~2x real time, with
  transcriptions and turnComplete; caller speech during playback interrupts it (barge-in).
* ``bench``: each audio chunk is answered at once with ``chunk + chunk[:len(chunk)//2]``; only
  counters are kept (``audio_in`` stays empty), so memory stays flat however long a benchmark runs.
Standalone: ``python simulator.py --mode echo --port 9443 --ca-out ca.pem``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import math
import re
import shutil
import signal
import ssl
import sys
import tempfile
import time
from array import array
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trustme
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("simulator")

MODES = ("echo", "script", "bench")
PATH_RE = re.compile(
    r"/ws/google\.ai\.generativelanguage\.(v1beta|v1alpha|v1)\.GenerativeService\.BidiGenerateContent"
)
OUT_MIME = "audio/pcm;rate=24000"
CLOSE_INVALID_ARGUMENT = 1007  # what Gemini uses for a bad key, bad setup or bad payload
BAD_KEY_REASON = "API key not valid. Please pass a valid API key."

IN_RATE, OUT_RATE = 16_000, 24_000  # s16le mono both ways
WINDOW_MS = 20
WINDOW_BYTES = IN_RATE * 2 * WINDOW_MS // 1000
SPEECH_RMS = 500.0  # window RMS (of 32767) at or above which it counts as speech
MIN_SPEECH_MS = 200  # shorter bursts followed by quiet are dropped as noise
END_QUIET_MS = 400
BARGE_IN_MS = 60  # a single click during playback should not interrupt it
ECHO_CHUNK_BYTES = OUT_RATE * 2 // 10  # 100 ms per serverContent, like the service
ECHO_PACE = 2.0  # seconds of audio sent per wall second: ahead of playback, yet interruptible

_TO_STD_B64 = str.maketrans("-_", "+/")


def decode_b64(data: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not: clients differ, the service takes both."""
    s = data.translate(_TO_STD_B64)
    return base64.b64decode(s + "=" * (-len(s) % 4))


def _samples(pcm: bytes) -> array[int]:
    """s16le as an array: native order, which is little-endian on every host this runs on."""
    return array("h", pcm[: len(pcm) - len(pcm) % 2])


def rms(pcm: bytes) -> float:
    """Root mean square of s16le samples."""
    a = _samples(pcm)
    return math.sqrt(sum(x * x for x in a) / len(a)) if a else 0.0


def resample_16k_to_24k(pcm: bytes) -> bytes:
    """Linear interpolation: each pair of input samples becomes three output samples."""
    s = _samples(pcm)
    if len(s) % 2:
        s.append(s[-1])
    out = array("h")
    put = out.append
    for k in range(0, len(s), 2):
        a, b = s[k], s[k + 1]
        c = s[k + 2] if k + 2 < len(s) else b
        put(a)
        put((a + 2 * b) // 3)
        put((2 * b + c) // 3)
    return out.tobytes()


def audio_message(pcm: bytes) -> dict[str, Any]:
    """One serverContent carrying model audio, shaped as Gemini sends it."""
    blob = {"mimeType": OUT_MIME, "data": base64.b64encode(pcm).decode("ascii")}
    return {"serverContent": {"modelTurn": {"parts": [{"inlineData": blob}]}}}


def _get(d: dict[str, Any], snake: str, camel: str) -> Any:
    return d[snake] if snake in d else d.get(camel)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content.get("parts", []) if isinstance(content, dict) else []
    return "".join(p.get("text") or "" for p in parts if isinstance(p, dict))


class SimSession:
    """One client connection as the simulator saw it, and the controls a test uses to answer it.

    The send_* coroutines raise websockets' ConnectionClosed once the connection is gone.
    """

    def __init__(self, ws: ServerConnection, path: str, api_version: str, keep_audio: bool) -> None:
        assert ws.request is not None
        self._ws = ws
        self.path = path
        self.api_version = api_version
        self.api_key: str | None = ws.request.headers.get("x-goog-api-key")
        self.setup: dict[str, Any] = {}
        self.model = ""
        self.system_instruction = ""
        self.resumption_handle: str | None = None
        self.audio_in = bytearray()  # stays empty in bench mode
        self.audio_bytes_in = 0
        self.audio_chunks_in = 0
        self.mime_types: list[str] = []
        self.audio_stream_ends = 0
        self.client_contents: list[dict[str, Any]] = []
        self.frames_in = 0
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._keep_audio = keep_audio
        self._audio_arrived = asyncio.Event()

    def _apply_setup(self, setup: dict[str, Any]) -> None:
        self.setup = setup
        self.model = str(setup.get("model", ""))
        self.system_instruction = _text_of(_get(setup, "system_instruction", "systemInstruction"))
        resumption = _get(setup, "session_resumption", "sessionResumption")
        if isinstance(resumption, dict):
            self.resumption_handle = resumption.get("handle") or None

    def _record_audio(self, pcm: bytes, mime: str) -> None:
        self.audio_chunks_in += 1
        self.audio_bytes_in += len(pcm)
        if self._keep_audio:
            self.audio_in += pcm
        if mime not in self.mime_types:
            self.mime_types.append(mime)
        self._audio_arrived.set()

    def _mark_closed(self, code: int | None) -> None:
        if self.close_code is None:
            self.close_code = code
        self.closed.set()
        self._audio_arrived.set()  # wake wait_audio so it fails now, not at its timeout

    async def wait_audio(self, nbytes: int, timeout: float = 5) -> bytes:  # noqa: ASYNC109 (API)
        """Wait until ``nbytes`` of client audio arrived; return the first ``nbytes`` of it.

        Bench sessions keep no audio: the wait counts bytes and returns b"". Raises TimeoutError, or
        EOFError if the connection ends first.
        """
        async with asyncio.timeout(timeout):
            while self.audio_bytes_in < nbytes:
                if self.closed.is_set():
                    raise EOFError(f"session closed after {self.audio_bytes_in} of {nbytes} bytes")
                self._audio_arrived.clear()
                await self._audio_arrived.wait()
        return bytes(self.audio_in[:nbytes])

    async def ping(self) -> float:
        """Round trip of a WebSocket ping, in seconds: answered only while the client reads."""
        pong = await self._ws.ping()
        return await pong

    async def send_raw(self, message: dict[str, Any]) -> None:
        """Send one server message as JSON in a binary frame, as Google does."""
        await self._ws.send(json.dumps(message, separators=(",", ":")).encode())

    async def send_audio(self, pcm: bytes, chunk_bytes: int = ECHO_CHUNK_BYTES) -> None:
        """Send model audio (24 kHz s16le), one modelTurn message per ``chunk_bytes``."""
        for i in range(0, len(pcm), chunk_bytes):
            await self.send_raw(audio_message(pcm[i : i + chunk_bytes]))

    async def send_turn_complete(self) -> None:
        await self.send_raw({"serverContent": {"turnComplete": True}})

    async def send_interrupted(self) -> None:
        await self.send_raw({"serverContent": {"interrupted": True}})

    async def send_transcript(self, role: str, text: str) -> None:
        """``role`` "user" sends an inputTranscription, "coach" an outputTranscription."""
        key = {"user": "inputTranscription", "coach": "outputTranscription"}[role]
        await self.send_raw({"serverContent": {key: {"text": text}}})

    async def send_go_away(self, time_left: str = "50s") -> None:
        await self.send_raw({"goAway": {"timeLeft": time_left}})

    async def send_resumption_update(self, handle: str, resumable: bool = True) -> None:
        update = {"newHandle": handle, "resumable": resumable}
        await self.send_raw({"sessionResumptionUpdate": update})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code``/``reason``; waits for the closing handshake. No-op once closed."""
        if not self.closed.is_set() and self.close_code is None:
            self.close_code = code
        await self._ws.close(code, reason)


class _Echo:
    """Echo mode for one session: utterance detection and playback, with barge-in."""

    def __init__(self, session: SimSession, tg: asyncio.TaskGroup) -> None:
        self._s = session
        self._tg = tg
        self._pending = bytearray()  # less than one window
        self._utterance = bytearray()  # from the first speech window on, trailing quiet included
        self._speech_ms = 0
        self._quiet_ms = 0
        self._reply: asyncio.Task[None] | None = None

    def _replying(self) -> bool:
        return self._reply is not None and not self._reply.done()

    async def feed(self, pcm: bytes) -> None:
        self._pending += pcm
        while len(self._pending) >= WINDOW_BYTES:
            window = bytes(self._pending[:WINDOW_BYTES])
            del self._pending[:WINDOW_BYTES]
            await self._window(window)

    async def _window(self, window: bytes) -> None:
        if rms(window) >= SPEECH_RMS:
            self._utterance += window
            self._speech_ms += WINDOW_MS
            self._quiet_ms = 0
            if self._speech_ms >= BARGE_IN_MS and self._replying():
                await self._interrupt()
        elif self._utterance:
            self._utterance += window
            self._quiet_ms += WINDOW_MS
            if self._quiet_ms >= END_QUIET_MS:
                if self._speech_ms >= MIN_SPEECH_MS:
                    await self._answer()
                else:
                    self._reset()

    async def stream_end(self) -> None:
        """The mic stopped: whatever speech there is makes an utterance."""
        self._pending.clear()
        if self._speech_ms:
            await self._answer()
        else:
            self._reset()

    def _reset(self) -> None:
        self._utterance.clear()
        self._speech_ms = self._quiet_ms = 0

    async def _answer(self) -> None:
        quiet = self._quiet_ms // WINDOW_MS * WINDOW_BYTES  # the trailing quiet is not echoed
        pcm = bytes(self._utterance[: len(self._utterance) - quiet])
        self._reset()
        if self._replying():
            await self._interrupt()
        self._reply = self._tg.create_task(self._play(pcm))

    async def _interrupt(self) -> None:
        self.cancel()
        await self._s.send_interrupted()  # like the service: mark the cut-off turn, then end it
        await self._s.send_turn_complete()

    def cancel(self) -> None:
        if self._reply is not None:
            self._reply.cancel()  # lands at its next await: forget it now, or it looks alive
            self._reply = None

    async def _play(self, pcm16: bytes) -> None:
        seconds = len(pcm16) / (IN_RATE * 2)
        loop = asyncio.get_running_loop()
        try:
            await self._s.send_transcript("user", f"(you spoke {seconds:.1f} s)")
            out = resample_16k_to_24k(pcm16)
            start = loop.time()
            for i in range(0, len(out), ECHO_CHUNK_BYTES):
                delay = start + i / (OUT_RATE * 2) / ECHO_PACE - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not synchronisation
                await self._s.send_raw(audio_message(out[i : i + ECHO_CHUNK_BYTES]))
            await self._s.send_transcript("coach", f"(echo of {seconds:.1f} s)")
            await self._s.send_turn_complete()
        except ConnectionClosed:
            pass  # the caller hung up mid-reply; the reader ends the session


class LiveSimulator:
    """A Gemini Live stand-in on ``url`` (TLS, CA in ``ca_file``); usable as ``async with``."""

    def __init__(
        self,
        mode: str = "echo",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        cert_dir: str | None = None,
        transcripts: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.host = host
        self.port = port
        self.api_key = api_key
        self.cert_dir = cert_dir
        self.transcripts = transcripts  # bench mode: replies also carry transcription fragments
        self.url = ""
        self.ca_file = ""
        self.sessions: list[SimSession] = []
        self._connected = 0
        self._cursor = 0
        self._sessions_changed = asyncio.Condition()
        self._server: Server | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def open_sessions(self) -> int:
        """Connections currently open (including any that have not sent setup yet)."""
        return self._connected

    async def start(self) -> None:
        """Make the CA and server certificate, listen, and write the CA PEM to ``ca_file``."""
        if self.cert_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="livesim-")
        cert_dir = Path(self.cert_dir or self._tmp.name)  # type: ignore[union-attr]
        cert_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (start-up, once)
        ca = trustme.CA()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        self._server = await serve(
            self._handle, self.host, self.port, ssl=ctx, process_request=self._check_path
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"https://{self.host}:{self.port}"
        # Named by port: simulators sharing a cert_dir each keep their own CA.
        self.ca_file = str(cert_dir / f"ca-{self.port}.pem")
        ca.cert_pem.write_to_path(self.ca_file)

    async def stop(self) -> None:
        """Close every connection with 1001 (going away), wait for handlers, drop the temp CA."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> LiveSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def next_session(self, timeout: float = 5) -> SimSession:  # noqa: ASYNC109 (API)
        """Return the first session recorded after the one the previous call returned."""
        async with asyncio.timeout(timeout), self._sessions_changed:
            await self._sessions_changed.wait_for(lambda: len(self.sessions) > self._cursor)
        self._cursor += 1
        return self.sessions[self._cursor - 1]

    def skip_recorded(self) -> None:
        """Make `next_session()` wait for sessions that connect from now on."""
        self._cursor = len(self.sessions)

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if PATH_RE.fullmatch(urlsplit(request.path).path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _record(self, session: SimSession) -> None:
        async with self._sessions_changed:
            self.sessions.append(session)
            self._sessions_changed.notify_all()

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        match = PATH_RE.fullmatch(urlsplit(ws.request.path).path)
        assert match is not None  # _check_path turned the rest away
        session = SimSession(ws, match[0], match[1], keep_audio=self.mode != "bench")
        self._connected += 1
        started = time.monotonic()
        try:
            await self._run(ws, session)
        except ConnectionClosed:
            pass  # the client may go at any time
        finally:
            await ws.close()  # idempotent; makes close_code final
            self._connected -= 1
            session._mark_closed(ws.close_code)
            took, code, n_in = (
                time.monotonic() - started,
                session.close_code,
                session.audio_bytes_in,
            )
            log.info("session closed: code=%s audio_in=%d bytes in %.1f s", code, n_in, took)

    async def _run(self, ws: ServerConnection, session: SimSession) -> None:
        first = _parse(await ws.recv())
        session.frames_in += 1
        setup = first.get("setup")
        if not isinstance(setup, dict):
            await session.close(CLOSE_INVALID_ARGUMENT, "The first message must be setup.")
            return
        session._apply_setup(setup)
        if self.api_key is not None and session.api_key != self.api_key:
            await session.close(CLOSE_INVALID_ARGUMENT, BAD_KEY_REASON)
            await self._record(session)
            return
        await session.send_raw({"setupComplete": {}})
        await self._record(session)
        log.info("session open: %s model=%s mode=%s", session.api_version, session.model, self.mode)
        async with asyncio.TaskGroup() as tg:
            echo = _Echo(session, tg) if self.mode == "echo" else None
            try:
                await self._read(ws, session, echo)
            finally:
                if echo is not None:
                    echo.cancel()

    async def _read(self, ws: ServerConnection, session: SimSession, echo: _Echo | None) -> None:
        """Read until the connection ends; never pause, so keepalive pings keep being answered."""
        try:
            async for raw in ws:
                session.frames_in += 1
                msg = _parse(raw)
                realtime = _get(msg, "realtime_input", "realtimeInput")
                if isinstance(realtime, dict):
                    await self._realtime(session, realtime, echo)
                content = _get(msg, "client_content", "clientContent")
                if isinstance(content, dict):
                    session.client_contents.append(content)
        except ConnectionClosed:
            pass

    async def _realtime(self, session: SimSession, rt: dict[str, Any], echo: _Echo | None) -> None:
        blobs = [rt["audio"]] if isinstance(rt.get("audio"), dict) else []
        blobs += _get(rt, "media_chunks", "mediaChunks") or []  # legacy form
        for blob in blobs:
            mime = _get(blob, "mime_type", "mimeType") if isinstance(blob, dict) else None
            if not isinstance(mime, str) or not mime.startswith("audio/"):
                continue  # images/video are not this simulator's business
            pcm = decode_b64(blob.get("data", ""))
            session._record_audio(pcm, mime)
            if (
                self.mode == "bench"
            ):  # awaited inline: a client that stops reading gets backpressure
                reply = audio_message(pcm + pcm[: len(pcm) // 2])
                if self.transcripts:  # as the service interleaves them with speech
                    reply["serverContent"]["inputTranscription"] = {"text": "you "}
                    reply["serverContent"]["outputTranscription"] = {"text": "coach "}
                await session.send_raw(reply)
            elif echo is not None:
                await echo.feed(pcm)
        if _get(rt, "audio_stream_end", "audioStreamEnd"):
            session.audio_stream_ends += 1
            if echo is not None:
                await echo.stream_end()


def _parse(raw: str | bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LiveSimulator(
        args.mode, args.host, args.port, args.api_key, transcripts=args.transcripts
    ) as sim:
        ca_file = sim.ca_file
        if args.ca_out:
            ca_file = shutil.copyfile(sim.ca_file, args.ca_out)
        print(f"GEMINI_BASE_URL={sim.url} SSL_CERT_FILE={ca_file}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Gemini Live simulator (TLS WebSocket).")
    parser.add_argument("--mode", choices=MODES, default="echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9443, help="0 picks a free port")
    parser.add_argument("--ca-out", help="also write the CA certificate (PEM) to this path")
    parser.add_argument("--api-key", help="if set, other keys are closed with 1007")
    parser.add_argument(
        "--transcripts", action="store_true", help="bench mode: transcription fragments too"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # it logs every connection too
    asyncio.run(_serve_until_signalled(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
