// Voice coach test page: sign in, pick a step, talk to the coach over the voice socket.
//
// Wire format (see DESIGN.md): the page sends binary frames of 16 kHz s16le mono PCM and plays the
// binary frames it gets back as 24 kHz s16le mono PCM. It offers the `coach.events.v1` subprotocol, so
// the server also sends JSON text frames, in order with the audio: session, interrupted (barge-in:
// queued playback is flushed at once), turn_complete, transcript fragments, and error before a close.
// The page itself never sends text.
//
// Authentication: the access token never goes in a URL. Right before each connection the page asks
// POST /voice/ticket/{step_id} (bearer token) for a single-use ticket and connects with `?ticket=`.
//
// Figures chosen here, and why:
// - FRAME_MS = 40: each microphone frame is one WebSocket message and one upstream realtime-input
//   message, and the relay's cost is per message (JSON, base64, framing), not per byte. 20 ms frames
//   double that cost for 20 ms less buffering; 100 ms frames would add up to 100 ms before the model
//   hears the first syllable and delay its end-of-speech detection. 40 ms (1280 bytes) halves the
//   message rate of 20 ms for at most 20 ms more delay.
// - PLAYBACK_LEAD = 50 ms: a buffer that arrives when nothing is queued starts this far ahead of the
//   audio clock, so small network jitter does not open a gap; buffers that arrive while others are
//   queued are scheduled exactly at the end of the previous one (no gap, no overlap).

const FRAME_MS = 40;
const CAPTURE_RATE = 16000;
const PLAYBACK_RATE = 24000;
const PLAYBACK_LEAD = 0.05; // seconds
// Send-side bounds (drop policy: a microphone frame that finds a bound full is dropped and counted;
// late speech is worse than lost speech in a live conversation).
const MAX_QUEUED_BEFORE_OPEN = Math.round(3000 / FRAME_MS); // frames captured while the socket opens
const MAX_BUFFERED_BYTES = 64 * 1024; // ~2 s of 16 kHz audio waiting in the browser's socket buffer
const SCHEDULE_LIMIT = 2000;
const EVENT_LIMIT = 500; // coachDebug.events and .flushLog keep the most recent ones
const EVENTS_PROTOCOL = "coach.events.v1";
const SPEAKERS = { user: "You:", coach: "Coach:" };
const WORKLET_URL = new URL("capture-worklet.js", import.meta.url);
const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
};
const CLOSE_WORDS = {
  1000: "Closed",
  1001: "Server going away",
  1003: "Unsupported data",
  1006: "Connection lost",
  1007: "Invalid audio data",
  1008: "Refused",
  1009: "Audio frame too large",
  1011: "Server error",
  1012: "Server restarting",
  1013: "Try again later",
  1014: "AI service error",
};

const $ = (id) => document.getElementById(id);
const els = {
  apiBase: $("api-base"), loginForm: $("login-form"), email: $("email"), password: $("password"),
  tokenForm: $("token-form"), token: $("token"), who: $("who"), step: $("step"),
  start: $("start"), stop: $("stop"), level: $("level"), status: $("status"), error: $("error"),
  transcript: $("transcript"),
};

let accessToken = null;
let call = null; // the live call, or null
let lastCall = null; // kept after it ends so tests can read what was released

// ---- test hook: measurable facts about the last call ------------------------------------------

// Times named `...At` are performance.now() milliseconds; `start`, `duration`, `arrived` and `ctxTime`
// are audio-clock seconds of the playback context.
const debug = {
  framesSent: 0, bytesSent: 0, framesDropped: 0,
  buffersReceived: 0, bytesReceived: 0, buffersScheduled: 0, buffersEnded: 0,
  // One entry per played buffer: {start, duration, arrived, receivedAt, stoppedAt, endedAt, flushed}.
  // buffersEnded counts the buffers that played to their end; flushed ones are not counted there.
  schedule: [],
  protocol: null, sessionId: null,
  events: [], // the server's text frames: {type, at} (+ code for "error"), the last EVENT_LIMIT
  // flushes: how many times queued playback was dropped; flushLog: {reason ("interrupted", "end",
  // "debug"), eventAt, at, ctxTime, stopped (sources stopped), playing (of those, already started)}.
  flushes: 0, flushLog: [],
  closeCode: null, closeReason: null, lastStatus: els.status.textContent,
  captureRate: null, playbackRate: null, level: 0, levelPeak: 0,
  micTrackState() {
    const tracks = lastCall && lastCall.stream ? lastCall.stream.getAudioTracks() : [];
    return tracks.length ? (tracks.every((t) => t.readyState === "ended") ? "ended" : "live") : "none";
  },
  micSettings() {
    const track = lastCall && lastCall.stream ? lastCall.stream.getAudioTracks()[0] : null;
    return track ? track.getSettings() : null; // what the browser applied (rate, processing)
  },
  contextsState() {
    return {
      capture: lastCall && lastCall.captureCtx ? lastCall.captureCtx.state : "none",
      playback: lastCall && lastCall.playCtx ? lastCall.playCtx.state : "none",
    };
  },
  playback() {
    const c = lastCall;
    if (!c || !c.playCtx) return null;
    const now = c.playCtx.currentTime;
    let playing = 0;
    let queueEnd = now;
    for (const entry of c.sources.values()) {
      if (entry.start <= now) playing++;
      queueEnd = Math.max(queueEnd, entry.start + entry.duration);
    }
    return { currentTime: now, alive: c.sources.size, playing, queueEnd, nextTime: c.nextTime };
  },
  // RMS of the playback graph's output over the last ~10 ms (a passive analyser tap): 0 is silence.
  outputLevel() {
    const tap = lastCall && lastCall.tap;
    if (!tap || lastCall.playCtx.state === "closed") return 0;
    const data = new Float32Array(tap.fftSize);
    tap.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    return Math.sqrt(sum / data.length);
  },
  transcriptLines: () => [...els.transcript.children].map((p) => p.textContent),
  flushPlayback: () => call && flushPlayback(call, "debug"),
};
window.coachDebug = debug;

function resetDebug() {
  Object.assign(debug, {
    framesSent: 0, bytesSent: 0, framesDropped: 0,
    buffersReceived: 0, bytesReceived: 0, buffersScheduled: 0, buffersEnded: 0,
    schedule: [], protocol: null, sessionId: null, events: [], flushes: 0, flushLog: [],
    closeCode: null, closeReason: null, captureRate: null, playbackRate: null,
    level: 0, levelPeak: 0,
  });
}

function keepLast(list, limit) {
  if (list.length > limit) list.splice(0, list.length - limit);
}

// ---- page state -------------------------------------------------------------------------------

function setStatus(text) {
  els.status.textContent = text;
  debug.lastStatus = text;
}

function showError(text) {
  els.error.textContent = text;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.hidden = true;
}

function updateButtons() {
  const running = call !== null;
  els.start.disabled = running || !accessToken || !els.step.value;
  els.stop.disabled = !running;
  els.step.disabled = running || !accessToken;
}

function apiBase() {
  return els.apiBase.value.trim().replace(/\/+$/, "");
}

function errorText(err) {
  return err instanceof Error ? err.message : String(err);
}

// ---- HTTP: login and the step list ------------------------------------------------------------

// The server answered with an error: `detail` is its own text ({"error": ...}) or the status text.
class HttpError extends Error {
  constructor(status, detail) {
    super(detail || `${status}`);
    this.status = status;
    this.detail = detail || "Request refused";
  }
}

async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(apiBase() + path, init);
  } catch (err) {
    throw new Error(`Could not reach ${apiBase() || "the API"}: ${errorText(err)}`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const text = body && typeof body.error === "string" ? body.error : "";
    const error = new HttpError(response.status, text || response.statusText);
    if (!text) error.message = `${response.status} ${response.statusText}`;
    throw error;
  }
  return body;
}

async function logIn(event) {
  event.preventDefault();
  clearError();
  try {
    const body = await api("/auth/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ email: els.email.value.trim(), password: els.password.value }),
    });
    els.password.value = "";
    await useToken(body.access_token, `Signed in as ${els.email.value.trim()}.`);
  } catch (err) {
    showError(errorText(err));
  }
}

async function logInWithToken(event) {
  event.preventDefault();
  clearError();
  try {
    await useToken(els.token.value.trim(), "Signed in with a token.");
  } catch (err) {
    showError(errorText(err));
  }
}

async function useToken(token, who) {
  const impacts = await api("/impacts", { headers: { Authorization: `Bearer ${token}` } });
  accessToken = token;
  els.who.textContent = who;
  fillSteps(impacts);
  setStatus("Ready");
}

function fillSteps(impacts) {
  const options = [];
  for (const impact of impacts) {
    for (const step of impact.steps) {
      options.push(new Option(`${impact.title} — ${step.title}`, step.id));
    }
  }
  if (!options.length) options.push(new Option("You have no steps yet", ""));
  els.step.replaceChildren(...options);
  updateButtons();
}

// ---- the voice socket -------------------------------------------------------------------------

// The one place that decides how the socket authenticates: a fresh single-use ticket (valid about a
// minute) for this step, fetched with the bearer token right before each connection; the token itself
// never appears in a URL (proxy logs, browser history). A refusal throws HttpError (404: not the
// caller's step; 401: the token expired).
async function voiceSocketUrl(stepId) {
  const step = encodeURIComponent(stepId);
  const { ticket } = await api(`/voice/ticket/${step}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${accessToken}` },
    cache: "no-store",
  });
  const url = new URL(`${apiBase() || location.origin}/voice/stream/${step}`);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("ticket", ticket);
  return url.href;
}

function describeClose(code, reason, stoppedByUser) {
  const words = reason || (stoppedByUser && code === 1000 ? "Stopped" : CLOSE_WORDS[code]) || "Closed";
  return `${words} (${code})`;
}

async function start() {
  const stepId = els.step.value;
  if (!stepId || !accessToken || call) return;
  clearError();
  resetDebug();
  // Both contexts are made inside the click, so autoplay policies let them run.
  const c = {
    ws: null, stream: null, source: null, node: null, ended: false, stoppedByUser: false, failure: null,
    serverError: null, // the last {"type":"error"} event: shown if the close frame itself is lost
    captureCtx: new AudioContext(), // the device rate: never force 16 kHz (Firefox refuses)
    playCtx: playbackContext(),
    tap: null,
    sources: new Map(), // scheduled source -> its debug.schedule entry, until it ends or is flushed
    nextTime: 0, carry: null, queued: [],
    line: null, // the transcript line that fragments are appended to: {role, text: <span>}
  };
  c.tap = c.playCtx.createAnalyser(); // passive: nothing downstream; only coachDebug reads it
  c.tap.fftSize = 256;
  els.transcript.replaceChildren();
  call = lastCall = c;
  debug.captureRate = c.captureCtx.sampleRate;
  debug.playbackRate = c.playCtx.sampleRate;
  c.playCtx.resume().catch(() => {});
  updateButtons();
  setStatus("Connecting…");
  try {
    // The worklet loads first; then the socket handshake and the microphone request overlap, and
    // what is captured before the socket opens is queued (bounded), so the first words are kept.
    const [url] = await Promise.all([
      voiceSocketUrl(stepId),
      c.captureCtx.audioWorklet.addModule(WORKLET_URL),
    ]);
    if (c.ended) return;
    openSocket(c, url);
    const stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    c.stream = stream;
    if (c.ended) return release(c); // stopped (or refused) while the browser asked for the mic
    startCapture(c, stream);
  } catch (err) {
    if (c.ended) return; // stopped meanwhile: that is what the status says
    if (err instanceof HttpError) {
      // The ticket was refused: shown like a socket refusal, with the HTTP status instead of a code.
      c.failure = `${err.detail} (HTTP ${err.status})`;
    } else {
      const secure = window.isSecureContext ? "" : " (the microphone needs HTTPS or localhost)";
      showError(`Could not start: ${errorText(err)}${secure}`);
      c.failure = "Not started";
    }
    setStatus(c.failure);
    end(c);
  }
}

function playbackContext() {
  try {
    return new AudioContext({ sampleRate: PLAYBACK_RATE }); // model audio plays at its own rate
  } catch {
    return new AudioContext(); // buffers are still made at 24 kHz; the browser resamples them
  }
}

function openSocket(c, url) {
  const ws = new WebSocket(url, [EVENTS_PROTOCOL]);
  ws.binaryType = "arraybuffer";
  c.ws = ws;
  ws.onopen = () => {
    debug.protocol = ws.protocol;
    if (c.ended) return;
    setStatus("Connected: speak now");
    for (const frame of c.queued) sendFrame(c, frame);
    c.queued = [];
  };
  ws.onmessage = (event) => {
    if (c.ended) return;
    if (event.data instanceof ArrayBuffer) playPcm(c, event.data);
    else if (typeof event.data === "string") onEvent(c, event.data);
  };
  ws.onclose = (event) => {
    debug.closeCode = event.code;
    debug.closeReason = event.reason;
    const lost = event.code === 1006 && c.serverError; // the server said why, then the link broke
    const { code, reason } = lost ? c.serverError : event;
    setStatus(c.failure || describeClose(code, reason, c.stoppedByUser));
    end(c);
  };
}

// ---- the event channel (coach.events.v1) -------------------------------------------------------

function onEvent(c, text) {
  const at = performance.now(); // taken first: what barge-in latency is measured from
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return; // not ours to interpret; the audio goes on
  }
  if (!event || typeof event.type !== "string") return;
  const record = { type: event.type, at };
  if (event.type === "error") record.code = event.code;
  debug.events.push(record);
  keepLast(debug.events, EVENT_LIMIT);
  switch (event.type) {
    case "session":
      debug.sessionId = event.id;
      break;
    case "interrupted": // the caller spoke over the coach: what is queued must not be heard
      flushPlayback(c, "interrupted", at);
      endLine(c);
      break;
    case "turn_complete":
      endLine(c);
      break;
    case "transcript":
      addTranscript(c, event.role, String(event.text ?? ""), event.final === true);
      break;
    case "error": // sent just before the close frame, which normally says the same
      c.serverError = { code: event.code, reason: String(event.reason ?? "") };
      setStatus(describeClose(c.serverError.code, c.serverError.reason, false));
      break;
    default: // unknown types are ignored: the server may add some
  }
}

// Consecutive fragments of one speaker make one line, until the speaker changes, a fragment is
// final, or the turn completes or is interrupted.
function addTranscript(c, role, text, final) {
  if (!c.line || c.line.role !== role) {
    const p = document.createElement("p");
    p.className = `line ${role === "user" ? "user" : "coach"}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = SPEAKERS[role] || `${role}:`;
    const said = document.createElement("span");
    p.append(who, " ", said);
    els.transcript.append(p);
    c.line = { role, said };
  }
  c.line.said.textContent += text;
  if (final) endLine(c);
  els.transcript.scrollTop = els.transcript.scrollHeight;
}

function endLine(c) {
  c.line = null;
}

function startCapture(c, stream) {
  c.source = c.captureCtx.createMediaStreamSource(stream);
  c.node = new AudioWorkletNode(c.captureCtx, "capture-16k", {
    numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
    processorOptions: { frameMs: FRAME_MS },
  });
  c.node.port.onmessage = (event) => onFrame(c, event.data);
  c.node.onprocessorerror = () => {
    showError("Microphone capture failed (audio worklet error)");
    end(c);
  };
  c.source.connect(c.node);
  c.captureCtx.resume().catch(() => {});
}

function onFrame(c, { pcm, rms }) {
  if (c.ended) return;
  debug.level = rms;
  debug.levelPeak = Math.max(debug.levelPeak, rms);
  // dBFS mapped onto 0..1: -60 dB (silence) .. 0 dB (full scale).
  els.level.value = Math.max(0, Math.min(1, 1 + (20 * Math.log10(rms || 1e-6)) / 60));
  if (c.ws && c.ws.readyState === WebSocket.OPEN) {
    sendFrame(c, pcm);
  } else if (c.queued.length < MAX_QUEUED_BEFORE_OPEN) {
    c.queued.push(pcm);
  } else {
    debug.framesDropped++;
  }
}

function sendFrame(c, pcm) {
  if (c.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
    debug.framesDropped++;
    return;
  }
  c.ws.send(pcm);
  debug.framesSent++;
  debug.bytesSent += pcm.byteLength;
}

// ---- playback ---------------------------------------------------------------------------------

function playPcm(c, data) {
  debug.buffersReceived++;
  let bytes = new Uint8Array(data);
  if (c.carry !== null) {
    // Frame boundaries are arbitrary: a sample may be split across two messages.
    const joined = new Uint8Array(bytes.length + 1);
    joined[0] = c.carry;
    joined.set(bytes, 1);
    bytes = joined;
    c.carry = null;
  }
  if (bytes.length % 2) {
    c.carry = bytes[bytes.length - 1];
    bytes = bytes.subarray(0, bytes.length - 1);
  }
  debug.bytesReceived += data.byteLength;
  const n = bytes.length / 2;
  if (n === 0) return;
  const samples = bytes.byteOffset % 2 ? new Int16Array(bytes.slice().buffer) : new Int16Array(bytes.buffer, bytes.byteOffset, n);
  const ctx = c.playCtx;
  const buffer = ctx.createBuffer(1, n, PLAYBACK_RATE);
  const out = buffer.getChannelData(0);
  for (let i = 0; i < n; i++) out[i] = samples[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  source.connect(c.tap);
  const startAt = Math.max(c.nextTime, ctx.currentTime + PLAYBACK_LEAD);
  source.start(startAt);
  c.nextTime = startAt + buffer.duration;
  const entry = {
    start: startAt, duration: buffer.duration, arrived: ctx.currentTime,
    receivedAt: performance.now(), stoppedAt: null, endedAt: null, flushed: false,
  };
  c.sources.set(source, entry);
  source.onended = () => {
    entry.endedAt = performance.now();
    if (c.sources.delete(source)) debug.buffersEnded++; // played to its end (not flushed)
  };
  debug.buffersScheduled++;
  debug.schedule.push(entry);
  keepLast(debug.schedule, SCHEDULE_LIMIT);
}

// Stops every scheduled buffer at once (the one playing and all those queued after it) and restarts
// the clock, so that the next audio plays as soon as it arrives. Barge-in calls it on "interrupted";
// ending a call does too.
function flushPlayback(c, reason, eventAt = performance.now()) {
  const ctxTime = c.playCtx.currentTime;
  const at = performance.now();
  let playing = 0;
  for (const [source, entry] of c.sources) {
    if (entry.start <= ctxTime) playing++;
    entry.flushed = true;
    entry.stoppedAt = at;
    try {
      source.stop();
    } catch {
      // already stopped
    }
  }
  const stopped = c.sources.size;
  c.sources.clear();
  c.nextTime = 0;
  c.carry = null; // a half sample of the interrupted turn must not prefix the next one
  debug.flushes++;
  debug.flushLog.push({ reason, eventAt, at, ctxTime, stopped, playing });
  keepLast(debug.flushLog, EVENT_LIMIT);
}

// ---- ending a call ----------------------------------------------------------------------------

function stop() {
  if (!call) return;
  const c = call;
  c.stoppedByUser = true;
  // Before the socket exists (e.g. while the ticket is fetched) no close event will say it ended.
  setStatus(c.ws ? "Stopping…" : "Stopped");
  end(c);
}

// Idempotent: releases everything the call holds. The socket's close event reports the outcome.
function end(c) {
  if (c.ended) return;
  c.ended = true;
  release(c);
  if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
  if (call === c) call = null;
  els.level.value = 0;
  updateButtons();
}

function release(c) {
  flushPlayback(c, "end");
  c.queued = [];
  if (c.stream) for (const track of c.stream.getTracks()) track.stop();
  if (c.node) c.node.port.onmessage = null;
  if (c.source) c.source.disconnect();
  for (const ctx of [c.captureCtx, c.playCtx]) {
    if (ctx.state !== "closed") ctx.close().catch(() => {});
  }
}

// ---- wiring -----------------------------------------------------------------------------------

els.apiBase.value = location.origin.startsWith("http") ? location.origin : "";
els.loginForm.addEventListener("submit", logIn);
els.tokenForm.addEventListener("submit", logInWithToken);
els.step.addEventListener("change", updateButtons);
els.start.addEventListener("click", start);
els.stop.addEventListener("click", stop);
window.addEventListener("pagehide", () => call && stop());
updateButtons();
