// Capture AudioWorklet: microphone at the device rate -> 16 kHz s16le mono frames for the voice socket.
//
// The AudioContext runs at the device rate (forcing 16 kHz breaks Firefox: it refuses to connect a
// microphone to a context at another rate), so this processor resamples itself:
//   1. a windowed-sinc low-pass (Blackman, cut-off 0.45 x 16 kHz) removes what would alias above 8 kHz;
//   2. linear interpolation at a fractional read position that carries across process() calls, so
//      block boundaries (128 samples) leave no seam;
//   3. clamp to [-1, 1] and convert to Int16.
// Output is posted in fixed frames of `frameMs` (set by app.js) as transferable ArrayBuffers, each with
// the frame's RMS for the level meter. The node is created with channelCount 1 / "explicit", so the
// graph has already mixed a stereo device down to mono.

const TARGET_RATE = 16000;

function lowPassKernel(inputRate) {
  const cutoff = (0.45 * TARGET_RATE) / inputRate; // cycles per input sample
  const half = Math.ceil(12 * (inputRate / TARGET_RATE)); // 36 taps either side at 48 kHz
  const size = 2 * half + 1;
  const h = new Float32Array(size);
  let sum = 0;
  for (let i = 0; i < size; i++) {
    const m = i - half;
    const sinc = m === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * m) / (Math.PI * m);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (size - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (size - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < size; i++) h[i] /= sum; // unity gain at DC
  return h;
}

class Capture16k extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frameMs = (options.processorOptions && options.processorOptions.frameMs) || 40;
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.kernel = sampleRate > TARGET_RATE ? lowPassKernel(sampleRate) : null;
    // Filter input: the last (kernel length - 1) samples of the previous block, then the new block.
    this.work = new Float32Array(this.kernel ? this.kernel.length - 1 + 128 : 0);
    this.filtered = new Float32Array(128);
    this.pos = 0; // where the next output sample falls, in input samples from this block's start
    this.prev = 0; // the previous block's last (filtered) sample: index -1 for the interpolation
    this.frameSamples = Math.round((TARGET_RATE * frameMs) / 1000);
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.sumSquares = 0;
  }

  lowPass(block) {
    const h = this.kernel;
    if (!h) return block;
    const keep = h.length - 1;
    const n = block.length;
    if (this.work.length !== keep + n) {
      const work = new Float32Array(keep + n);
      work.set(this.work.subarray(0, keep)); // the history sits at the front (see copyWithin below)
      this.work = work;
      this.filtered = new Float32Array(n);
    }
    const work = this.work;
    work.set(block, keep);
    const out = this.filtered;
    for (let j = 0; j < n; j++) {
      let acc = 0;
      // out[j] = sum h[k] * x[j - k], with x[j] stored at work[j + keep]
      for (let k = 0, x = j + keep; k <= keep; k++, x--) acc += h[k] * work[x];
      out[j] = acc;
    }
    work.copyWithin(0, n); // keep the newest `keep` samples for the next block
    return out;
  }

  emit(value) {
    const v = value > 1 ? 1 : value < -1 ? -1 : value;
    this.frame[this.fill++] = Math.round(v * 32767);
    this.sumSquares += v * v;
    if (this.fill === this.frameSamples) {
      const rms = Math.sqrt(this.sumSquares / this.fill);
      const pcm = this.frame.buffer;
      this.port.postMessage({ pcm, rms }, [pcm]);
      this.frame = new Int16Array(this.frameSamples); // the old one was transferred (now empty)
      this.fill = 0;
      this.sumSquares = 0;
    }
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // not connected yet, or the track ended: stay alive until closed
    const y = this.lowPass(channel);
    const n = y.length;
    const step = this.step;
    let pos = this.pos;
    // Interpolate between y[i] and y[i + 1]; y[-1] is the previous block's last sample.
    while (pos < n - 1) {
      const i = Math.floor(pos);
      const frac = pos - i;
      const a = i < 0 ? this.prev : y[i];
      this.emit(a + (y[i + 1] - a) * frac);
      pos += step;
    }
    this.pos = pos - n;
    this.prev = y[n - 1];
    return true;
  }
}

registerProcessor("capture-16k", Capture16k);
