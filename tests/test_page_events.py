"""The page's event channel in a real headless Chromium, with the model scripted from the test.

The simulator stays in script mode here (test_page.py switches it to echo for its whole module), so
each test decides what the "coach" sends: a tone to play, then `interrupted` (barge-in), transcript
fragments, or an upstream failure. The browser, the app and the fake microphone come from
test_page.py; the microphone's speech reaches the scripted model, which ignores it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import test_page
from conftest import PASSWORD, World
from playwright.async_api import Page, expect
from test_page import OUT_RATE, WAIT_MS, Site, new_session, open_and_log_in, wait_until_released

from simulator import LiveSimulator, SimSession

# The same fixtures as test_page.py (a browser, the app and a second origin, a page), made anew for
# this module: pytest finds fixtures among a module's attributes.
speech, browser, sites, page = test_page.speech, test_page.browser, test_page.sites, test_page.page

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def script_mode(simulator: LiveSimulator) -> Iterator[None]:
    """Whatever ran before: here the test is the model (the mode is read when a session opens)."""
    mode, simulator.mode = simulator.mode, "script"
    yield
    simulator.mode = mode


FLUSH_BOUND_MS = 100  # barge-in: queued coach audio must be silent this soon after "interrupted"


def tone(seconds: float, hz: float, amplitude: float = 0.3) -> bytes:
    """24 kHz s16le mono sine, as the model speaks."""
    t = np.arange(round(seconds * OUT_RATE)) / OUT_RATE
    return (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype("<i2").tobytes()


async def start_call(page: Page, site: Site, world: World, simulator: LiveSimulator) -> SimSession:
    user = await world.user()
    await world.plan(user, title="Run a 5K", steps=1)
    await open_and_log_in(page, site, user.email, PASSWORD)
    await expect(page.get_by_label("Step")).to_have_text("Run a 5K — Step 1", timeout=WAIT_MS)
    before = {id(s) for s in simulator.sessions}
    await page.get_by_role("button", name="Start", exact=True).click()
    sim = await new_session(page, simulator, before)
    await expect(page.get_by_role("status")).to_have_text("Connected: speak now", timeout=WAIT_MS)
    assert await page.evaluate("coachDebug.protocol") == "coach.events.v1"
    return sim


async def stop_call(page: Page) -> None:
    await page.get_by_role("button", name="Stop", exact=True).click()
    await wait_until_released(page)
    await expect(page.get_by_role("status")).to_have_text("Stopped (1000)")


# Armed before the test sends "interrupted": resolves once the page has flushed for it and the
# playback graph's output (an analyser over the last ~10 ms) is exactly zero, with when that was.
WATCH_FOR_SILENCE = """
(waitMs) => {
  window.silenceAfterFlush = new Promise((resolve) => {
    const deadline = performance.now() + waitMs;
    const tick = () => {
      const flush = coachDebug.flushLog.find((f) => f.reason === "interrupted");
      if (flush && coachDebug.outputLevel() === 0) {
        resolve({ flush, silentAt: performance.now(), playback: coachDebug.playback() });
      } else if (performance.now() > deadline) {
        resolve(null);
      } else {
        setTimeout(tick, 1);
      }
    };
    tick();
  });
}
"""


async def test_barge_in_silences_queued_playback_at_once_and_new_audio_plays(
    page: Page, sites: dict[str, Site], world: World, simulator: LiveSimulator
) -> None:
    sim = await start_call(page, sites["same-origin"], world, simulator)
    first = tone(3.0, 440)
    # 30 model messages of 100 ms; the relay may join those that pile up into larger frames.
    await sim.send_audio(first)
    # All of it is scheduled, and the tone is audible in the playback graph.
    await page.wait_for_function(
        f"""() => coachDebug.bytesReceived === {len(first)}
                  && coachDebug.playback().playing === 1 && coachDebug.outputLevel() > 0.05""",
        timeout=WAIT_MS,
    )
    before = await page.evaluate("coachDebug.playback()")
    assert before["queueEnd"] - before["currentTime"] > 2.0  # most of the 3 s is still queued
    await page.evaluate(WATCH_FOR_SILENCE, WAIT_MS)
    await sim.send_interrupted()
    silence = await page.evaluate("window.silenceAfterFlush")
    assert silence is not None, "the playback never fell silent after the interruption"
    # Every source alive at the flush reports its end.
    await page.wait_for_function(
        "() => coachDebug.schedule.every((e) => e.endedAt !== null)", timeout=WAIT_MS
    )
    d = await page.evaluate("({...coachDebug, playbackNow: coachDebug.playback()})")
    flush = silence["flush"]
    event_at = flush["eventAt"]
    assert [e["at"] for e in d["events"] if e["type"] == "interrupted"] == [event_at]
    assert d["flushes"] == 1 and flush["reason"] == "interrupted"
    old = d["schedule"]
    assert all(e["receivedAt"] < event_at for e in old)
    flushed = [e for e in old if e["flushed"]]
    played = [e for e in old if not e["flushed"]]
    # Sources that ended on their own did so before the event; all others were stopped by it.
    assert all(e["endedAt"] <= event_at for e in played)
    assert len(flushed) == flush["stopped"] >= before["alive"] - 1
    assert flush["playing"] >= 1  # the one playing (2 if it fell on a buffer boundary)
    stop_ms = flush["at"] - event_at
    ended_ms = max(e["endedAt"] for e in flushed) - event_at
    silent_ms = silence["silentAt"] - event_at
    cut_s = before["queueEnd"] - flush["ctxTime"]
    print(
        f"\nbarge-in: {len(flushed)} sources alive at the event ({flush['playing']} playing, "
        f"{cut_s:.2f} s of queued audio dropped); stop() called {stop_ms:.2f} ms after the event "
        f"arrived; last onended {ended_ms:.1f} ms after; playback graph silent "
        f"(analyser, 256 samples) {silent_ms:.1f} ms after"
    )
    assert stop_ms < 5
    assert ended_ms < FLUSH_BOUND_MS
    assert silent_ms < FLUSH_BOUND_MS
    assert cut_s > 1.0
    # Audio after the event plays normally, at once (the clock was reset, not queued behind the
    # flushed tone), and to its end.
    scheduled = d["buffersScheduled"]
    second = tone(0.5, 660)
    await sim.send_audio(second)
    await page.wait_for_function(
        f"""() => coachDebug.bytesReceived === {len(first) + len(second)}
                  && coachDebug.playback().playing === 1 && coachDebug.outputLevel() > 0.05""",
        timeout=WAIT_MS,
    )
    await page.wait_for_function(
        f"""() => coachDebug.buffersScheduled > {scheduled}
                  && coachDebug.schedule.every((e) => e.endedAt !== null)
                  && coachDebug.outputLevel() === 0""",
        timeout=WAIT_MS,
    )
    after = await page.evaluate("({...coachDebug, playbackNow: coachDebug.playback()})")
    new = [e for e in after["schedule"] if e["receivedAt"] > event_at]
    assert len(new) == after["buffersScheduled"] - scheduled > 0
    assert not any(e["flushed"] for e in new)
    assert sum(e["duration"] for e in new) == pytest.approx(0.5)
    assert new[0]["start"] - new[0]["arrived"] <= 0.051  # the lead alone, not the old queue
    # The new audio is over and the graph is silent while the old tone would still be playing.
    assert after["playbackNow"]["currentTime"] < before["queueEnd"]
    assert after["buffersEnded"] == len(played) + len(new)
    await stop_call(page)


async def test_transcript_fragments_join_into_lines_per_speaker(
    page: Page, sites: dict[str, Site], world: World, simulator: LiveSimulator
) -> None:
    sim = await start_call(page, sites["same-origin"], world, simulator)
    area = page.get_by_role("log", name="Transcript")
    await expect(area).to_have_attribute("aria-live", "polite")
    lines = area.locator("p")
    for piece in ["How ", "do I ", "start?"]:
        await sim.send_transcript("user", piece)
    for piece in ["Put on ", "your shoes."]:
        await sim.send_transcript("coach", piece)
    await expect(lines).to_have_text(
        ["You: How do I start?", "Coach: Put on your shoes."], timeout=WAIT_MS
    )
    await sim.send_turn_complete()
    await sim.send_transcript("coach", "Ready?")  # a new turn: a new line, same speaker
    await sim.send_interrupted()
    await sim.send_transcript("coach", "Go!")  # cut off and resumed: a new line again
    await expect(lines).to_have_text(
        ["You: How do I start?", "Coach: Put on your shoes.", "Coach: Ready?", "Coach: Go!"],
        timeout=WAIT_MS,
    )
    types = [e["type"] for e in await page.evaluate("coachDebug.events")]
    assert types == ["session"] + ["transcript"] * 5 + ["turn_complete", "transcript"] + [
        "interrupted",
        "transcript",
    ]
    await stop_call(page)
    await expect(lines).to_have_count(4)  # kept after the call, cleared by the next Start


async def test_an_error_event_before_the_close_shows_in_the_status(
    page: Page, sites: dict[str, Site], world: World, simulator: LiveSimulator
) -> None:
    sim = await start_call(page, sites["same-origin"], world, simulator)
    await sim.close(1011)  # the AI service fails
    await expect(page.get_by_role("status")).to_have_text(
        "AI service error (1011)", timeout=WAIT_MS
    )
    await wait_until_released(page)
    d = await page.evaluate("coachDebug")
    assert d["events"][-1]["type"] == "error" and d["events"][-1]["code"] == d["closeCode"] == 1011
    assert d["closeReason"] == "AI service error"
    await expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()
