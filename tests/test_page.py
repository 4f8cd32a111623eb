"""The test page in a real headless Chromium whose fake microphone plays real speech (espeak-ng).

One conversation per origin (the page served by the app, and the same files served from another
origin with "API base" pointing at the app) runs once and is then examined by one test per behaviour:
the simulator (echo mode) hears the speech, the page plays the echo back to back, connects with a
single-use ticket and the event channel (transcripts shown), and Stop releases everything. Barge-in and
transcripts driven by a scripted model are in test_page_events.py. Needs Debian's `chromium`, `espeak-ng` and `sox`; Playwright drives /usr/bin/chromium
(never `playwright install`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import shutil
import socket
import subprocess
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PASSWORD, ServeFactory, World
from hypercorn.asyncio import serve
from hypercorn.config import Config
from playwright.async_api import Browser, Page, async_playwright, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from simulator import LiveSimulator, SimSession

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SPEECH_TEXT = "Hello coach, let us talk about my first five kilometre race"
PAD_SECONDS = 1.5  # silence after the speech, so the echo's end-of-utterance detection fires
IN_RATE, OUT_RATE = 16_000, 24_000
WAIT_MS = 20_000  # bound of every wait on the page


@dataclasses.dataclass
class Speech:
    fake_mic: Path  # the speech followed by PAD_SECONDS of silence, as the microphone plays it
    reference_16k: np.ndarray  # the speech alone, resampled to 16 kHz by sox, as float
    seconds: float  # the speech alone


@dataclasses.dataclass
class Conversation:
    origin: str
    debug: dict[str, Any]  # window.coachDebug after Stop
    heard: np.ndarray  # what the simulator received: 16 kHz s16le as float
    mime_types: list[str]
    socket_urls: list[str]  # every WebSocket the page opened, as the browser saw it
    token: str  # the user's access token, which must appear in no URL
    transcript: list[str]  # the lines of the transcript area after Stop


# ---- the world: speech, a browser, the app and a second origin ---------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    tools = {tool: shutil.which(tool) for tool in ("espeak-ng", "sox", CHROMIUM)}
    if None in tools.values():
        pytest.fail(f"missing {tools}: apt-get install -y chromium espeak-ng sox")
    espeak, sox = tools["espeak-ng"], tools["sox"]
    tmp = tmp_path_factory.mktemp("speech")
    spoken, fake_mic, reference = tmp / "speech.wav", tmp / "fake-mic.wav", tmp / "ref16k.wav"
    for command in (
        [espeak, "-w", spoken, SPEECH_TEXT],
        [sox, spoken, fake_mic, "pad", "0", str(PAD_SECONDS)],  # silence after the speech
        [sox, spoken, "-r", str(IN_RATE), "-c", "1", "-b", "16", reference],  # sox's good resampler
    ):
        subprocess.run(command, check=True, capture_output=True)  # fixed arguments
    ref = _read_wav(reference)
    return Speech(fake_mic, ref, len(ref) / IN_RATE)


@pytest.fixture(scope="module")
async def browser(speech: Speech) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech.fake_mic}%noloop",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        await chromium.close()


@pytest.fixture(scope="module")
def echo_mode(simulator: LiveSimulator) -> Iterator[None]:
    """The simulator answers each utterance with itself; read per session, at connect time."""
    simulator.mode = "echo"
    yield
    simulator.mode = "script"


@dataclasses.dataclass
class Site:
    page_url: str  # where the browser opens the page
    api_base: str  # what goes in "API base"


@pytest.fixture(scope="module")
async def sites(serve_app: ServeFactory) -> AsyncIterator[dict[str, Site]]:
    """The app (allowing the other origin), and the static files served alone from another port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections wait in the backlog until Hypercorn accepts: no readiness poll
    other = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with serve_app(allowed_origins=(other,)) as app, _serve_static(sock):
        yield {
            "same-origin": Site(page_url=app.url + "/", api_base=app.url),
            "cross-origin": Site(page_url=other + "/", api_base=app.url),
        }


@contextlib.asynccontextmanager
async def _serve_static(sock: socket.socket) -> AsyncIterator[None]:
    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    site = Starlette(
        routes=[Route("/", index), Mount("/static", StaticFiles(directory=STATIC_DIR))]
    )
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = 1
    stop = asyncio.Event()
    served = asyncio.create_task(serve(site, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(served, 10)


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ---- driving the page -------------------------------------------------------------------------


async def open_and_log_in(page: Page, site: Site, email: str, password: str) -> None:
    await page.goto(site.page_url)
    api_base = page.get_by_label("API base")
    if site.page_url.startswith(site.api_base):
        await expect(api_base).to_have_value(site.api_base)  # defaults to the page's own origin
    await api_base.fill(site.api_base)
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in", exact=True).click()


async def wait_until_released(page: Page) -> None:
    await page.wait_for_function(
        """() => coachDebug.closeCode !== null && coachDebug.micTrackState() === "ended"
                 && Object.values(coachDebug.contextsState()).every((s) => s === "closed")""",
        timeout=WAIT_MS,
    )


async def new_session(page: Page, simulator: LiveSimulator, before: set[int]) -> SimSession:
    """The first simulator session that is not in `before` (other tests may leave theirs unread)."""
    try:
        while True:
            session = await simulator.next_session(timeout=WAIT_MS / 1000)
            if id(session) not in before:
                return session
    except TimeoutError:
        status = await page.get_by_role("status").text_content()
        pytest.fail(f"no model session opened; the page says {status!r}")


# The page asks for the browser's voice processing (echo cancellation, noise suppression, gain
# control). This wrapper records what it asked for; on the "clean capture" run it also turns the
# processing off, so that what the model hears can be compared with the source sample by sample.
# Chromium's processing high-passes the voice, shifts the phase of its upper band and varies its gain:
# with it on, the waveform correlation is about 0.8 whatever the page does (0.99+ without), so those
# runs compare spectrograms instead.
RECORD_GET_USER_MEDIA = """
(clean) => {
  const devices = navigator.mediaDevices;
  const original = devices.getUserMedia.bind(devices);
  window.requestedConstraints = [];
  devices.getUserMedia = (constraints) => {
    window.requestedConstraints.push(JSON.parse(JSON.stringify(constraints)));
    if (!clean) return original(constraints);
    const off = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
    return original({ ...constraints, audio: { ...constraints.audio, ...off } });
  };
}
"""


async def converse(
    browser: Browser,
    site: Site,
    speech: Speech,
    world: World,
    simulator: LiveSimulator,
    *,
    origin: str,
    clean: bool = False,
) -> Conversation:
    """Log in through the form, pick a step, Start, let the echo play out, Stop."""
    user = await world.user(name="Pat Runner")
    plan = await world.plan(user, title="Run a 5K", steps=3)
    context = await browser.new_context()
    try:
        await context.add_init_script(f"({RECORD_GET_USER_MEDIA})({'true' if clean else 'false'})")
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        socket_urls: list[str] = []
        page.on("websocket", lambda ws: socket_urls.append(ws.url))
        await open_and_log_in(page, site, user.email, PASSWORD)
        step = page.get_by_label("Step")
        await expect(step).to_contain_text("Run a 5K — Step 2", timeout=WAIT_MS)
        await expect(step.locator("option")).to_have_count(3)
        await step.select_option(label="Run a 5K — Step 2")
        assert await step.input_value() == str(plan.step_ids[1])

        before = {id(s) for s in simulator.sessions}
        await page.get_by_role("button", name="Start", exact=True).click()
        sim = await new_session(page, simulator, before)
        # The whole fake-mic file has reached the model: the utterance has ended and its echo began.
        whole_file = int((speech.seconds + PAD_SECONDS - 0.2) * IN_RATE) * 2
        await sim.wait_audio(whole_file, timeout=WAIT_MS / 1000)
        # The echo arrives at ~2x real time, so once every received buffer has played and the turn
        # is complete (its transcripts came before), it is over.
        await page.wait_for_function(
            """() => coachDebug.buffersReceived > 0
                     && coachDebug.buffersEnded === coachDebug.buffersReceived
                     && coachDebug.events.some((e) => e.type === "turn_complete")""",
            timeout=WAIT_MS,
        )
        mic_settings = await page.evaluate("coachDebug.micSettings()")
        await page.get_by_role("button", name="Stop", exact=True).click()
        await wait_until_released(page)
        await expect(page.get_by_role("status")).to_have_text("Stopped (1000)")
        debug = await page.evaluate(
            """() => ({...coachDebug, micTrackState: coachDebug.micTrackState(),
                       contextsState: coachDebug.contextsState(),
                       requestedConstraints: window.requestedConstraints})"""
        )
        debug["micSettings"] = mic_settings
        transcript = await page.locator("#transcript p").all_text_contents()
        async with asyncio.timeout(WAIT_MS / 1000):
            await sim.closed.wait()  # the relay closed upstream: `audio_in` is final
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        await context.close()
    heard = np.frombuffer(bytes(sim.audio_in), dtype="<i2").astype(np.float64)
    return Conversation(
        origin, debug, heard, list(sim.mime_types), socket_urls, user.token, transcript
    )


@pytest.fixture(scope="module", params=["same-origin", "cross-origin"])
async def conversation(
    request: pytest.FixtureRequest,
    browser: Browser,
    sites: dict[str, Site],
    speech: Speech,
    world: World,
    simulator: LiveSimulator,
    echo_mode: None,
) -> Conversation:
    origin = request.param
    return await converse(browser, sites[origin], speech, world, simulator, origin=origin)


@pytest.fixture(scope="module")
async def clean_conversation(
    browser: Browser,
    sites: dict[str, Site],
    speech: Speech,
    world: World,
    simulator: LiveSimulator,
    echo_mode: None,
) -> Conversation:
    site = sites["same-origin"]
    return await converse(
        browser, site, speech, world, simulator, origin="same-origin, clean capture", clean=True
    )


# ---- measuring --------------------------------------------------------------------------------


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, IN_RATE)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def best_lag(heard: np.ndarray, reference: np.ndarray) -> int:
    """The lag L maximising sum(heard[n + L] * reference[n]), by FFT cross-correlation."""
    size = 1 << (len(heard) + len(reference)).bit_length()
    spectrum = np.fft.rfft(heard, size) * np.conj(np.fft.rfft(reference, size))
    xcorr = np.fft.irfft(spectrum, size)
    lag = int(np.argmax(xcorr))
    return lag - size if lag > size // 2 else lag


@dataclasses.dataclass
class Fidelity:
    lag: int  # heard[n + lag] is reference[n]
    coverage: float  # share of the speech present in what was heard, once aligned
    waveform_r: float  # Pearson r of the aligned samples over that overlap
    spectrum_r: float  # Pearson r of the aligned magnitude spectrograms (300 Hz - 7 kHz)


def fidelity(heard: np.ndarray, reference: np.ndarray) -> Fidelity:
    lag = best_lag(heard, reference)
    first, last = max(0, -lag), min(len(reference), len(heard) - lag)
    if last - first < IN_RATE // 10:
        return Fidelity(lag, 0.0, 0.0, 0.0)
    ours, theirs = heard[first + lag : last + lag], reference[first:last]
    return Fidelity(
        lag,
        (last - first) / len(reference),
        float(np.corrcoef(ours, theirs)[0, 1]),
        float(np.corrcoef(spectrogram(ours).ravel(), spectrogram(theirs).ravel())[0, 1]),
    )


def spectrogram(x: np.ndarray, size: int = 512, hop: int = 160) -> np.ndarray:
    """Magnitudes of 32 ms Hann windows every 10 ms, 300 Hz to 7 kHz (the voice, above the
    browser's high-pass filter)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::hop] * np.hanning(size)
    freqs = np.fft.rfftfreq(size, 1 / IN_RATE)
    return np.abs(np.fft.rfft(frames, axis=1))[:, (freqs >= 300) & (freqs <= 7000)]


def replies(schedule: list[dict[str, float]], pause: float = 0.25) -> list[list[dict[str, float]]]:
    """Buffers grouped into replies: a new reply starts after `pause` s without any arrival."""
    groups: list[list[dict[str, float]]] = []
    for entry in schedule:
        if not groups or entry["arrived"] - groups[-1][-1]["arrived"] > pause:
            groups.append([])
        groups[-1].append(entry)
    return groups


def gaps_ms(reply: list[dict[str, float]]) -> list[float]:
    return [
        (b["start"] - (a["start"] + a["duration"])) * 1000 for a, b in itertools.pairwise(reply)
    ]


# ---- the behaviours ---------------------------------------------------------------------------


def describe_capture(c: Conversation, speech: Speech, f: Fidelity) -> str:
    d = c.debug
    return (
        f"\n[{c.origin}] capture at {d['captureRate']} Hz (mic {d['micSettings']}); "
        f"sent {d['framesSent']} frames of {d['bytesSent'] // max(1, d['framesSent'])} B, "
        f"{d['framesDropped']} dropped; model heard {len(c.heard) / IN_RATE:.2f} s for "
        f"{speech.seconds:.2f} s of speech; aligned at {f.lag / IN_RATE * 1000:+.1f} ms: speech "
        f"covered {f.coverage:.1%}, waveform r {f.waveform_r:.4f}, spectrogram r {f.spectrum_r:.4f}"
    )


def assert_heard_intact(c: Conversation, f: Fidelity) -> None:
    asked = c.debug["requestedConstraints"]
    assert asked == [
        {
            "audio": {
                "echoCancellation": True,
                "noiseSuppression": True,
                "autoGainControl": True,
                "channelCount": 1,
            }
        }
    ]
    assert c.mime_types == ["audio/pcm;rate=16000"]
    assert c.debug["bytesSent"] == len(c.heard) * 2  # every frame the page sent reached the model
    assert c.debug["levelPeak"] > 0.05  # the meter was fed from the worklet's RMS
    assert f.coverage >= 0.8


async def test_the_model_hears_the_speech_as_16khz_pcm(
    conversation: Conversation, speech: Speech
) -> None:
    f = fidelity(conversation.heard, speech.reference_16k)
    print(describe_capture(conversation, speech, f))
    assert_heard_intact(conversation, f)
    assert conversation.debug["micSettings"]["echoCancellation"] is True
    # Measured: a 10% rate error, swapped bytes or a 50 ms misalignment all score below 0.35.
    assert f.spectrum_r >= 0.8


async def test_without_browser_processing_the_model_hears_the_very_waveform(
    clean_conversation: Conversation, speech: Speech
) -> None:
    f = fidelity(clean_conversation.heard, speech.reference_16k)
    print(describe_capture(clean_conversation, speech, f))
    assert_heard_intact(clean_conversation, f)
    assert f.waveform_r >= 0.9


async def test_the_echo_is_played_back_to_back(conversation: Conversation) -> None:
    d = conversation.debug
    groups = replies(d["schedule"])
    gaps = [g for reply in groups for g in gaps_ms(reply)]
    played = sum(e["duration"] for e in d["schedule"])
    print(
        f"\n[{conversation.origin}] playback at {d['playbackRate']} Hz: {d['buffersReceived']} "
        f"buffers received, {d['buffersScheduled']} scheduled, {d['buffersEnded']} played out, "
        f"{played:.2f} s of audio in {len(groups)} repl{'y' if len(groups) == 1 else 'ies'} "
        f"of {[len(g) for g in groups]} buffers; largest gap inside a reply {max(gaps, default=0):.3f} ms, "
        f"largest overlap {-min(gaps, default=0):.3f} ms"
    )
    assert d["buffersReceived"] > 0
    assert d["buffersScheduled"] == d["buffersReceived"] == len(d["schedule"])
    assert d["buffersEnded"] == d["buffersScheduled"]  # every buffer was rendered to the end
    assert any(len(reply) > 1 for reply in groups)
    assert all(-0.1 <= g <= 5 for g in gaps)


def assert_ticket_url(url: str, token: str) -> None:
    """A voice socket URL that carries a ticket and no access token."""
    assert re.search(r"/voice/stream/[0-9a-f-]+\?ticket=[^&]+$", url), url
    assert "token=" not in url
    assert token not in url


async def test_the_socket_uses_a_ticket_and_the_event_channel(conversation: Conversation) -> None:
    d = conversation.debug
    types = [e["type"] for e in d["events"]]
    print(
        f"\n[{conversation.origin}] socket {conversation.socket_urls[0].split('?')[0]}?ticket=…, "
        f"protocol {d['protocol']!r}, events {types}, transcript {conversation.transcript}"
    )
    assert len(conversation.socket_urls) == 1
    assert_ticket_url(conversation.socket_urls[0], conversation.token)
    assert d["protocol"] == "coach.events.v1"
    assert types[0] == "session" and re.fullmatch(r"[0-9a-f-]{36}", d["sessionId"])
    assert "turn_complete" in types and "interrupted" not in types
    assert [f["reason"] for f in d["flushLog"]] == ["end"]  # only Stop stopped the playback
    # The echo's transcripts, one line per speaker, in order.
    assert re.fullmatch(r"You: \(you spoke \d+\.\d s\)", conversation.transcript[0])
    assert re.fullmatch(r"Coach: \(echo of \d+\.\d s\)", conversation.transcript[1])


async def test_stop_releases_the_mic_and_audio_and_closes_1000(conversation: Conversation) -> None:
    d = conversation.debug
    print(
        f"\n[{conversation.origin}] after Stop: close {d['closeCode']} {d['closeReason']!r}, "
        f"mic {d['micTrackState']}, contexts {d['contextsState']}, status {d['lastStatus']!r}"
    )
    assert d["closeCode"] == 1000
    assert d["micTrackState"] == "ended"
    assert d["contextsState"] == {"capture": "closed", "playback": "closed"}


async def test_a_wrong_password_shows_the_servers_error(
    page: Page, sites: dict[str, Site], world: World
) -> None:
    user = await world.user()
    await open_and_log_in(page, sites["same-origin"], user.email, "not the password")
    await expect(page.get_by_role("alert")).to_have_text("Invalid email or password")
    await expect(page.get_by_label("Step")).to_be_disabled()


async def test_a_pasted_token_lists_the_steps(
    page: Page, sites: dict[str, Site], world: World
) -> None:
    user = await world.user()
    await world.plan(user, title="Sleep better", steps=2)
    await page.goto(sites["same-origin"].page_url)
    await page.get_by_label("Token").fill(user.token)
    await page.get_by_role("button", name="Use token", exact=True).click()
    step = page.get_by_label("Step")
    await expect(step).to_contain_text("Sleep better — Step 2", timeout=WAIT_MS)
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()


async def test_a_bad_token_shows_the_servers_error(page: Page, sites: dict[str, Site]) -> None:
    await page.goto(sites["same-origin"].page_url)
    await page.get_by_label("Token").fill("not-a-token")
    await page.get_by_role("button", name="Use token", exact=True).click()
    await expect(page.get_by_role("alert")).to_have_text("Not authenticated")
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_disabled()


async def test_a_step_of_another_user_is_refused_with_its_reason(
    page: Page, sites: dict[str, Site], world: World
) -> None:
    """The socket refuses the step (its one ownership query): the reason and code show."""
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    user, other = await world.user(), await world.user()
    await world.plan(user, title="Mine", steps=1)
    theirs = await world.plan(other, title="Theirs", steps=1)
    await open_and_log_in(page, sites["same-origin"], user.email, PASSWORD)
    step = page.get_by_label("Step")
    await expect(step).to_have_text("Mine — Step 1", timeout=WAIT_MS)
    await step.evaluate(
        "(select, id) => select.add(new Option('Theirs — Step 1', id))", str(theirs.step_ids[0])
    )
    await step.select_option(str(theirs.step_ids[0]))
    await page.get_by_role("button", name="Start", exact=True).click()
    await expect(page.get_by_role("status")).to_have_text("Step not found (1008)", timeout=WAIT_MS)
    await page.wait_for_function(
        """() => Object.values(coachDebug.contextsState()).every((s) => s === "closed")""",
        timeout=WAIT_MS,
    )
    assert await page.evaluate("coachDebug.micTrackState()") in ("none", "ended")
    assert await page.evaluate("coachDebug.closeCode") == 1008
    assert len(sockets) == 1 and "ticket=" in sockets[0]
    await expect(page.get_by_role("alert")).to_be_hidden()
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()


async def test_a_socket_refusal_after_the_ticket_shows_its_reason_and_code(
    page: Page, serve_app: ServeFactory, world: World
) -> None:
    """The ticket is granted, the socket refuses (no AI key configured): the close's reason shows."""
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    user = await world.user()
    await world.plan(user, title="Mine", steps=1)
    async with serve_app(gemini_api_key=None) as app:
        await open_and_log_in(page, Site(app.url + "/", app.url), user.email, PASSWORD)
        await expect(page.get_by_label("Step")).to_have_text("Mine — Step 1", timeout=WAIT_MS)
        await page.get_by_role("button", name="Start", exact=True).click()
        await expect(page.get_by_role("status")).to_have_text(
            "Server configuration error for AI client (1011)", timeout=WAIT_MS
        )
        await wait_until_released(page)
    assert await page.evaluate("coachDebug.closeCode") == 1011
    assert len(sockets) == 1
    assert_ticket_url(sockets[0], user.token)
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()


async def test_a_refused_microphone_is_reported_and_nothing_is_left_open(
    page: Page, sites: dict[str, Site], world: World
) -> None:
    await page.add_init_script(
        """navigator.mediaDevices.getUserMedia = () =>
             Promise.reject(new DOMException("Permission denied", "NotAllowedError"));"""
    )
    user = await world.user()
    await world.plan(user, title="Mine", steps=1)
    await open_and_log_in(page, sites["same-origin"], user.email, PASSWORD)
    await expect(page.get_by_label("Step")).to_have_text("Mine — Step 1", timeout=WAIT_MS)
    await page.get_by_role("button", name="Start", exact=True).click()
    await expect(page.get_by_role("alert")).to_have_text("Could not start: Permission denied")
    await page.wait_for_function(
        """() => coachDebug.closeCode !== null
                 && Object.values(coachDebug.contextsState()).every((s) => s === "closed")""",
        timeout=WAIT_MS,
    )
    await expect(page.get_by_role("status")).to_have_text("Not started")
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()
