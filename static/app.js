// Voice coach test page: sign in, pick a step, talk to the coach over the voice socket.
//
// Wire format (see DESIGN.md): the page sends binary frames of 16 kHz s16le mono PCM and plays the
// binary frames it gets back as 24 kHz s16le mono PCM. No text frames either way.
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
};

let accessToken = null;
let call = null; // the live call, or null
let lastCall = null; // kept after it ends so tests can read what was released

// ---- test hook: measurable facts about the last call ------------------------------------------

const debug = {
  framesSent: 0, bytesSent: 0, framesDropped: 0,
  buffersReceived: 0, buffersScheduled: 0, buffersEnded: 0,
  schedule: [], // {start, duration, arrived}: audio-clock seconds of the playback context
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
  flushPlayback: () => call && flushPlayback(call),
};
window.coachDebug = debug;

function resetDebug() {
  Object.assign(debug, {
    framesSent: 0, bytesSent: 0, framesDropped: 0,
    buffersReceived: 0, buffersScheduled: 0, buffersEnded: 0,
    schedule: [], closeCode: null, closeReason: null, captureRate: null, playbackRate: null,
    level: 0, levelPeak: 0,
  });
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

async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(apiBase() + path, init);
  } catch (err) {
    throw new Error(`Could not reach ${apiBase() || "the API"}: ${errorText(err)}`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
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

// The one place that decides how the socket authenticates. When POST /voice/ticket/{step_id}
// lands, this becomes: POST for a single-use ticket with the bearer token, then `?ticket=`.
async function voiceSocketUrl(stepId) {
  const url = new URL(`${apiBase() || location.origin}/voice/stream/${encodeURIComponent(stepId)}`);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", accessToken);
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
    captureCtx: new AudioContext(), // the device rate: never force 16 kHz (Firefox refuses)
    playCtx: playbackContext(),
    sources: new Set(), nextTime: 0, carry: null, queued: [],
  };
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
    const secure = window.isSecureContext ? "" : " (the microphone needs HTTPS or localhost)";
    showError(`Could not start: ${errorText(err)}${secure}`);
    c.failure = "Not started";
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
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  c.ws = ws;
  ws.onopen = () => {
    if (c.ended) return;
    setStatus("Connected: speak now");
    for (const frame of c.queued) sendFrame(c, frame);
    c.queued = [];
  };
  ws.onmessage = (event) => {
    if (!c.ended && event.data instanceof ArrayBuffer) playPcm(c, event.data);
  };
  ws.onclose = (event) => {
    debug.closeCode = event.code;
    debug.closeReason = event.reason;
    setStatus(c.failure || describeClose(event.code, event.reason, c.stoppedByUser));
    end(c);
  };
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
  const startAt = Math.max(c.nextTime, ctx.currentTime + PLAYBACK_LEAD);
  source.start(startAt);
  c.nextTime = startAt + buffer.duration;
  c.sources.add(source);
  source.onended = () => {
    if (c.sources.delete(source)) debug.buffersEnded++;
  };
  debug.buffersScheduled++;
  debug.schedule.push({ start: startAt, duration: buffer.duration, arrived: ctx.currentTime });
  if (debug.schedule.length > SCHEDULE_LIMIT) debug.schedule.splice(0, debug.schedule.length - SCHEDULE_LIMIT);
}

// Stops every scheduled buffer at once and restarts the clock: what barge-in will call when the
// coach is interrupted, and what ending a call does.
function flushPlayback(c) {
  for (const source of c.sources) {
    source.onended = null;
    try {
      source.stop();
    } catch {
      // never started or already stopped
    }
  }
  c.sources.clear();
  c.nextTime = 0;
}

// ---- ending a call ----------------------------------------------------------------------------

function stop() {
  if (!call) return;
  const c = call;
  c.stoppedByUser = true;
  setStatus("Stopping…");
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
  flushPlayback(c);
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
