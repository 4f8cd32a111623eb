"""The load generator: N callers streaming PCM at real-time pace, each chunk's round trip timed.

Every chunk starts with a tag, `<HHHI` = (magic, round, caller, seq); the simulator's bench mode answers
each received chunk with `chunk + chunk[:len//2]`, so every reply starts with the tag of the chunk it
answers. Replies may arrive joined (the relay's outbox joins what piled up while a send was in flight)
and, should the relay ever batch upstream, one reply may answer several consecutive chunks: its first
k*L bytes are then those k chunks (tags at 0, L, 2L, ...), followed by (k*L)//2 echoed bytes. The parser
handles both, so every chunk is timed, lost or reordered chunks counted, whatever the relay does.

Two kinds of caller, interleaved round by round against the same simulator:
- relay: `ws://service/voice/stream/{step}?token=...`, binary frames both ways; offers permessage-deflate
  like a browser unless told not to;
- direct: the Live wire protocol straight to the simulator over TLS (setup, setupComplete, one
  `realtime_input` JSON per chunk, `serverContent.modelTurn.parts[].inlineData.data` back); no
  compression, as the relay's own upstream connection (gemini.py sets `compression=None`).

Sends are scheduled with `loop.call_later` per caller and phase-staggered across the frame period; each
chunk's send time is taken just before it is written, and how late each send was against its schedule
is recorded too ("send lag"), so a saturated generator shows up as such instead of as relay latency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import ssl
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.wsclient import WSClient, connect, deflate_body, stored_block

MAGIC = 0xB3C4
TAG = struct.Struct("<HHHI")
IN_RATE = 16_000
LIVE_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
SETUP = json.dumps({"setup": {"model": "models/x"}}).encode()
_RT_HEAD = b'{"realtime_input": {"audio": {"data": "'
_RT_TAIL = b'", "mime_type": "audio/pcm;rate=16000"}}}'


def frame_bytes(frame_ms: float) -> int:
    """Bytes of one frame of 16 kHz s16le; a multiple of 4 so that replies split evenly."""
    n = round(IN_RATE * 2 * frame_ms / 1000)
    n -= n % 4
    if n < 2 * TAG.size + 4:
        raise ValueError(f"frame of {frame_ms} ms is too short for the tag")
    return n


SPEECH_TEXT = (
    "Good morning coach. Today I want to talk about my training plan for the five kilometre run. "
    "I managed to jog for ten minutes yesterday, but my knees were a bit sore afterwards. What should "
    "I do to warm up properly, and how many times a week should I run at the start? I also want to "
    "know how to breathe while running, and whether I should stretch before or after."
)


def speech_pcm(noise: float = 30.0, seed: int = 7) -> tuple[bytes, str]:
    """Spoken English as 16 kHz s16le with a microphone-like noise floor, and where it came from.

    espeak-ng + sox when installed (deflate shrinks it to ~0.93, like real microphone speech); else a
    synthetic voiced signal. Silence would make permessage-deflate look free; random bytes, useless.
    """
    import shutil
    import subprocess
    import tempfile

    if shutil.which("espeak-ng") and shutil.which("sox"):
        with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
            wav, raw = f"{tmp}/speech.wav", f"{tmp}/speech.raw"
            try:
                subprocess.run(
                    ["espeak-ng", "-w", wav, SPEECH_TEXT], check=True, capture_output=True
                )
                subprocess.run(
                    ["sox", wav, "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", raw],
                    check=True,
                    capture_output=True,
                )
                with open(raw, "rb") as f:
                    pcm = array("h", f.read())
            except (OSError, subprocess.CalledProcessError):
                pcm = None
        if pcm:
            rng = random.Random(seed)
            for i in range(len(pcm)):
                pcm[i] = max(-32768, min(32767, pcm[i] + int(rng.gauss(0, noise))))
            return pcm.tobytes(), "espeak-ng speech + noise floor"
    return speech_like_pcm(), "synthetic voiced signal"


def speech_like_pcm(seconds: float = 12.0, seed: int = 7) -> bytes:
    """Voiced-sounding s16le: harmonics with a wandering pitch and envelope, plus noise.

    Not silence (which deflate shrinks to nothing) and long enough that no chunk repeats within
    deflate's 32 KiB window: compression costs and ratios are those of real speech, roughly.
    """
    rng = random.Random(seed)
    n = int(IN_RATE * seconds)
    out = array("h", bytes(2 * n))
    phase = 0.0
    for i in range(n):
        t = i / IN_RATE
        f0 = 140 + 40 * math.sin(2 * math.pi * 0.7 * t)
        phase += 2 * math.pi * f0 / IN_RATE
        env = 0.35 + 0.65 * abs(math.sin(2 * math.pi * 2.3 * t))
        v = sum(math.sin(k * phase) / k for k in (1, 2, 3, 5, 7))
        x = 5000 * env * v + rng.gauss(0, 60)
        out[i] = max(-32768, min(32767, int(x)))
    return out.tobytes()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


class Caller:
    """One simulated browser (or direct Live client): its schedule, its tags, its figures."""

    def __init__(
        self,
        gen: LoadGenerator,
        index: int,
        kind: str,
    ) -> None:
        self.gen = gen
        self.index = index
        self.kind = kind
        self.client: WSClient | None = None
        frames = gen.frames
        self.sent = array("d", bytes(8 * (frames + 1)))
        self.got = bytearray(frames + 1)
        self.latencies = array("d")
        self.received = 0
        self.reordered = 0
        self.duplicates = 0
        self.garbled = 0
        self.messages = 0
        self.batched = 0  # chunks answered by a reply that answered several (batched upstream)
        self.highest = 0
        self.next_seq = 1
        self.due = 0.0
        self.block0 = (index * 7919) % len(gen.bodies)  # callers start at different words
        self.probe: asyncio.Future[None] = gen.loop.create_future()
        self.setup: asyncio.Future[None] = gen.loop.create_future()
        self.error = ""
        self.on_message: Callable[[bytes, float], None] = (
            self.on_pcm if kind == "relay" else self.on_live_message
        )

    # building and sending chunks

    def send_chunk(self, seq: int) -> None:
        """Chunk `seq`: the tag, then the next frame of speech; timed from just before the write."""
        gen = self.gen
        client = self.client
        assert client is not None
        tag = TAG.pack(MAGIC, gen.round_id, self.index, seq)
        block = (self.block0 + seq) % len(gen.bodies)
        if self.kind == "relay":
            if client.deflate_negotiated:
                payload = stored_block(tag) + gen.deflated_body(block)
                self.sent[seq] = gen.time()
                client.send_frame(payload, compressed=True)
            else:
                payload = tag + gen.bodies[block]
                self.sent[seq] = gen.time()
                client.send_frame(payload)
        else:
            data = _RT_HEAD + base64.urlsafe_b64encode(tag + gen.bodies[block]) + _RT_TAIL
            self.sent[seq] = gen.time()
            client.send_frame(data, binary=False)

    def tick(self) -> None:
        """Send the chunk that is due, schedule the next: real-time pace, catching up if late."""
        gen = self.gen
        if gen.stopped or self.client is None or not self.client.is_open:
            return
        seq = self.next_seq
        gen.send_lag.append(gen.time() - self.due)
        self.send_chunk(seq)
        if seq >= gen.frames:
            return
        self.next_seq = seq + 1
        self.due = gen.t0 + self.phase + seq * gen.period
        gen.loop.call_later(max(0.0, self.due - gen.time()), self.tick)

    # receiving

    def on_live_message(self, data: bytes, now: float) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self.garbled += 1
            return
        content = msg.get("serverContent")
        if content is not None:
            for part in (content.get("modelTurn") or {}).get("parts") or ():
                blob = part.get("inlineData")
                if blob and blob.get("data"):
                    self.on_pcm(base64.b64decode(blob["data"]), now)
        elif "setupComplete" in msg and not self.setup.done():
            self.setup.set_result(None)

    def on_pcm(self, data: bytes, now: float) -> None:
        """One browser-bound frame: one or more replies, each answering one or more chunks."""
        self.messages += 1
        n = len(data)
        L = self.gen.frame_len
        unpack = TAG.unpack_from
        tag = TAG.size
        rnd = self.gen.round_id
        p = 0
        while p + tag <= n:
            magic, r, caller, seq = unpack(data, p)
            if magic != MAGIC or caller != self.index or r != rnd:
                self.garbled += 1
                return
            k = 1
            while p + k * L + tag <= n:
                magic, r, caller, s = unpack(data, p + k * L)
                if magic == MAGIC and caller == self.index and s == seq + k:
                    k += 1
                else:
                    break
            if k > 1:
                self.batched += k
            for j in range(k):
                self.arrived(seq + j, now)
            p += k * L + (k * L) // 2
        if p != n:
            self.garbled += 1

    def arrived(self, seq: int, now: float) -> None:
        if seq == 0:
            if not self.probe.done():
                self.probe.set_result(None)
            return
        if seq >= len(self.got):
            self.garbled += 1
            return
        if self.got[seq]:
            self.duplicates += 1
            return
        self.got[seq] = 1
        self.received += 1
        if seq < self.highest:
            self.reordered += 1
        else:
            self.highest = seq
        self.latencies.append(now - self.sent[seq])
        gen = self.gen
        gen.received_total += 1

    phase = 0.0


@dataclass
class RoundResult:
    kind: str
    callers: int
    connected: int
    seconds: float
    frame_ms: float
    deflate: bool
    negotiated: str = ""
    connect_seconds: float = 0.0
    sent: int = 0
    received: int = 0
    lost: int = 0
    reordered: int = 0
    duplicates: int = 0
    garbled: int = 0
    messages: int = 0
    batched: int = 0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    send_lag_max_ms: float = math.nan
    closed_early: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    foreign_cpu_percent: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class LoadGenerator:
    """One round: connect N callers, stream for `seconds`, drain, close; every wait is bounded."""

    def __init__(
        self,
        *,
        kind: str,
        urls: list[str],
        seconds: float,
        frame_ms: float,
        deflate: bool,
        round_id: int,
        source: bytes,
        ssl_context: ssl.SSLContext | None = None,
        connect_concurrency: int = 16,
        drain_seconds: float = 3.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        # Every timestamp is time.perf_counter() (ns resolution); timers go through call_later, since
        # uvloop's loop.time() ticks in whole milliseconds.
        self.time = time.perf_counter
        self.kind = kind
        self.urls = urls
        self.n = len(urls)
        self.seconds = seconds
        self.frame_ms = frame_ms
        self.period = frame_ms / 1000.0
        self.frame_len = frame_bytes(frame_ms)
        self.frames = max(1, round(seconds / self.period))
        self.deflate = deflate
        self.round_id = round_id & 0xFFFF
        n = self.frame_len
        self.bodies = [source[i + TAG.size : i + n] for i in range(0, len(source) - n + 1, n)]
        self._deflated: dict[int, bytes] = _DEFLATED.setdefault((id(source), n), {})
        if kind == "relay" and deflate:
            for block in range(len(self.bodies)):  # ~40 ms once per run, not during the round
                self.deflated_body(block)
        self.ssl_context = ssl_context
        self.connect_concurrency = connect_concurrency
        self.drain_seconds = drain_seconds
        self.send_lag = array("d")
        self.received_total = 0
        self.stopped = False
        self.t0 = 0.0
        self.callers = [Caller(self, i, kind) for i in range(self.n)]

    def deflated_body(self, block: int) -> bytes:
        out = self._deflated.get(block)
        if out is None:
            out = self._deflated[block] = deflate_body(self.bodies[block])
        return out

    async def _open(self, caller: Caller, url: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                caller.client = await connect(
                    url,
                    deflate=self.deflate if self.kind == "relay" else False,
                    on_message=caller.on_message,
                    ssl_context=self.ssl_context,
                    timeout=15.0,
                )
                if self.kind == "direct":
                    caller.client.send_text(SETUP)
                    async with asyncio.timeout(15.0):
                        await caller.setup
                # The probe (seq 0) proves the whole path is up, upstream session included.
                caller.send_chunk(0)
                async with asyncio.timeout(15.0):
                    await caller.probe
            except Exception as exc:
                caller.error = f"{type(exc).__name__}: {exc}"[:200]
                if caller.client is not None:
                    await caller.client.close(0.5)
                caller.client = None

    async def run(self, on_started: Callable[[], None] | None = None,
                  on_streamed: Callable[[], None] | None = None,
                  sampler: Callable[[], None] | None = None) -> RoundResult:  # fmt: skip
        result = RoundResult(
            kind=self.kind,
            callers=self.n,
            connected=0,
            seconds=self.seconds,
            frame_ms=self.frame_ms,
            deflate=self.deflate if self.kind == "relay" else False,
        )
        started = self.time()
        gate = asyncio.Semaphore(self.connect_concurrency)
        await asyncio.gather(*(self._open(c, u, gate) for c, u in zip(self.callers, self.urls)))
        result.connect_seconds = self.time() - started
        live = [c for c in self.callers if c.client is not None]
        result.connected = len(live)
        result.errors = sorted({c.error for c in self.callers if c.error})[:5]
        if live:
            result.negotiated = live[0].client.extensions  # type: ignore[union-attr]
        try:
            if live:
                await self._stream(live, on_started, on_streamed, sampler)
        finally:
            self.stopped = True
            await asyncio.gather(*(c.client.close(2.0) for c in live if c.client is not None))
        self._summarise(result, live)
        return result

    async def _stream(self, live: list[Caller], on_started: Callable[[], None] | None,
                      on_streamed: Callable[[], None] | None,
                      sampler: Callable[[], None] | None) -> None:  # fmt: skip
        self.t0 = self.time() + 0.1
        for i, c in enumerate(live):
            c.phase = self.period * i / len(live)
            c.due = self.t0 + c.phase
            self.loop.call_later(max(0.0, c.due - self.time()), c.tick)
        end = self.t0 + self.frames * self.period
        await asyncio.sleep(max(0.0, self.t0 - self.time()))
        if on_started:
            on_started()
        while self.time() < end:
            if sampler:
                sampler()
            await asyncio.sleep(min(0.5, max(0.0, end - self.time())))
        if on_streamed:
            on_streamed()
        expected = len(live) * self.frames
        drain_end = self.time() + self.drain_seconds
        while self.received_total < expected and self.time() < drain_end:
            if all(c.client is None or not c.client.is_open for c in live):
                break
            await asyncio.sleep(0.02)

    def _summarise(self, result: RoundResult, live: list[Caller]) -> None:
        lat: list[float] = []
        for c in live:
            lat.extend(c.latencies)
            result.received += c.received
            result.reordered += c.reordered
            result.duplicates += c.duplicates
            result.garbled += c.garbled
            result.messages += c.messages
            result.batched += c.batched
            client = c.client
            if client is not None and client.close_code is not None:
                key = f"{client.close_code} {client.close_reason}".strip()
                result.close_codes[key] = result.close_codes.get(key, 0) + 1
        # Every caller was due to send every frame; what never came back (or was never sent because
        # the connection had closed) is lost.
        result.sent = sum(min(c.next_seq, self.frames) for c in live)
        result.lost = len(live) * self.frames - result.received
        result.closed_early = sum(1 for c in live if c.next_seq < self.frames)
        lat.sort()
        if lat:
            result.p50_ms = 1000 * percentile(lat, 0.50)
            result.p95_ms = 1000 * percentile(lat, 0.95)
            result.p99_ms = 1000 * percentile(lat, 0.99)
            result.max_ms = 1000 * lat[-1]
            result.mean_ms = 1000 * sum(lat) / len(lat)
        lag = sorted(self.send_lag)
        if lag:
            result.send_lag_p99_ms = 1000 * percentile(lag, 0.99)
            result.send_lag_max_ms = 1000 * lag[-1]


_DEFLATED: dict[tuple[int, int], dict[int, bytes]] = {}


def tls_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx


def relay_urls(ws_base: str, callers: Sequence[Any], n: int) -> list[str]:
    return [f"{ws_base}/voice/stream/{c.step_id}?token={c.token}" for c in callers[:n]]


def direct_urls(sim_url: str, n: int) -> list[str]:
    return ["wss" + sim_url.removeprefix("https") + LIVE_PATH] * n
