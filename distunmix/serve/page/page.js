// distunmix's page: separate a file through the jobs API, or stream one live through /stream.
// No libraries, nothing from other sites: it talks to the app that served it, with relative URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const api = (path) => new URL(path, location.origin + base).toString();
let info = null; // GET /models
const stems = {}; // target -> {bytes, buffer, url, gain}
let audio = null; // the AudioContext that plays the stems
let sources = [];
let live = null; // the live stream being played

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function progress(value, text) {
  $("progress-row").hidden = false;
  $("progress").value = value;
  $("progress-text").textContent = text;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadInfo() {
  const response = await fetch(api("models"));
  if (!response.ok) {
    showError(await apiError(response));
    return;
  }
  info = await response.json();
  const kind = info.unidirectional ? "unidirectional: live mode works" : "bidirectional: no live mode";
  $("model").textContent = `${info.model}: ${info.targets.join(", ")} · ${info.sample_rate} Hz · ${kind}`;
  $("live-mode").disabled = !info.unidirectional;
}

function upload(file) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", api("jobs"));
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) progress(0.3 * e.loaded / e.total, `uploading ${Math.round(100 * e.loaded / e.total)} %`);
    };
    xhr.onload = () => {
      let body = {};
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = {};
      }
      if (xhr.status === 202) resolve(body.id);
      else reject(new Error(body.error || `HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new Error("the upload failed: the server could not be reached"));
    xhr.send(file);
  });
}

async function waitForJob(id) {
  for (;;) {
    const response = await fetch(api(`jobs/${id}`));
    if (!response.ok) throw new Error(await apiError(response));
    const job = await response.json();
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(job.error || "the job failed");
    progress(0.3 + 0.6 * (job.progress || 0), `separating: ${job.status}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

function drawWave(canvas, buffer) {
  const width = (canvas.width = canvas.clientWidth || 600);
  const height = (canvas.height = 48);
  const g = canvas.getContext("2d");
  const data = buffer.getChannelData(0);
  const step = Math.max(1, Math.floor(data.length / width));
  g.fillStyle = "#06c";
  for (let x = 0; x < width; x++) {
    let peak = 0;
    for (let i = x * step; i < Math.min(data.length, (x + 1) * step); i++) peak = Math.max(peak, Math.abs(data[i]));
    const h = Math.max(1, peak * height);
    g.fillRect(x, (height - h) / 2, 1, h);
  }
}

function applyGains() {
  const soloed = Object.keys(stems).filter((t) => stems[t].solo);
  for (const [target, stem] of Object.entries(stems)) {
    const audible = soloed.length ? stem.solo : !stem.muted;
    if (stem.gain) stem.gain.gain.value = audible ? 1 : 0;
    stem.row.querySelector(".mute").classList.toggle("on", stem.muted);
    stem.row.querySelector(".solo").classList.toggle("on", stem.solo);
    stem.row.dataset.audible = String(audible);
    void target;
  }
}

function stopAll() {
  for (const s of sources) s.stop();
  sources = [];
}

function playAll() {
  stopAll();
  const start = audio.currentTime + 0.1;
  for (const stem of Object.values(stems)) {
    const source = audio.createBufferSource();
    source.buffer = stem.buffer;
    stem.gain = audio.createGain();
    source.connect(stem.gain).connect(audio.destination);
    source.start(start);
    sources.push(source);
  }
  applyGains();
}

function stemRow(target, stem) {
  const row = document.createElement("div");
  row.className = "stem";
  row.dataset.target = target;
  row.innerHTML = `<strong></strong><canvas></canvas><span class="controls">
    <button type="button" class="solo">solo</button><button type="button" class="mute">mute</button>
    <a class="download">download</a></span><audio controls preload="auto"></audio>`;
  row.querySelector("strong").textContent = target;
  const link = row.querySelector(".download");
  link.href = stem.url;
  link.download = `${target}.wav`;
  row.querySelector("audio").src = stem.url;
  row.querySelector(".solo").onclick = () => {
    stem.solo = !stem.solo;
    applyGains();
  };
  row.querySelector(".mute").onclick = () => {
    stem.muted = !stem.muted;
    applyGains();
  };
  return row;
}

async function separate(file) {
  stopAll();
  $("player").hidden = true;
  $("stems").replaceChildren();
  const id = await upload(file);
  $("job").textContent = `job ${id}`;
  $("job").dataset.id = id;
  await waitForJob(id);
  audio = audio || new AudioContext();
  for (const [k, target] of info.targets.entries()) {
    progress(0.9 + 0.1 * k / info.targets.length, `downloading ${target}`);
    const response = await fetch(api(`jobs/${id}/${target}`));
    if (!response.ok) throw new Error(await apiError(response));
    const bytes = await response.arrayBuffer();
    const buffer = await audio.decodeAudioData(bytes.slice(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
    stems[target] = { buffer, url, solo: false, muted: false, gain: null };
    stems[target].row = stemRow(target, stems[target]);
    $("stems").append(stems[target].row);
    drawWave(stems[target].row.querySelector("canvas"), buffer);
  }
  applyGains();
  progress(1, "done");
  $("player").hidden = false;
}

async function streamLive(file) {
  stopLive();
  const rate = info.sample_rate;
  const context = new AudioContext({ sampleRate: rate });
  const decoded = await context.decodeAudioData(await file.arrayBuffer());
  const channels = Math.min(2, decoded.numberOfChannels);
  const planes = [...Array(channels).keys()].map((c) => decoded.getChannelData(c));
  const block = 4096;
  const blockMs = (1000 * block) / rate;
  const target = info.targets[0];
  $("live").hidden = false;
  $("live-targets").textContent = `playing: ${target}`;
  const ws = new WebSocket(api("stream").replace(/^http/, "ws"));
  ws.binaryType = "arraybuffer";
  live = { ws, context, timer: null, sent: [], next: 0, late: 0 };
  const state = live;
  ws.onopen = () => ws.send(JSON.stringify({ type: "hello", sample_rate: rate, channels, block, format: "f32", targets: [target] }));
  ws.onmessage = (event) => {
    if (typeof event.data === "string") {
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        state.ready = message;
        $("live-state").textContent = "streaming";
        sendBlocks(state, planes, block, blockMs);
      } else if (message.type === "error") {
        showError(message.error);
      } else if (message.type === "done") {
        $("live-state").textContent = "done";
      }
      return;
    }
    const head = new DataView(event.data, 0, 8);
    const seq = head.getUint32(0, true);
    const m = head.getUint32(4, true);
    const outChannels = state.ready.channels;
    if (seq < state.sent.length) {
      const trip = performance.now() - state.sent[seq];
      if (trip > blockMs) state.late += 1;
      $("latency").textContent = (state.ready.latency_ms + trip).toFixed(1);
      $("late").textContent = String(state.late);
    }
    if (m === 0) return;
    const samples = new Float32Array(event.data, 8, outChannels * m);
    const buffer = context.createBuffer(outChannels, m, rate);
    for (let c = 0; c < outChannels; c++) buffer.copyToChannel(samples.subarray(c * m, (c + 1) * m), c);
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(context.destination);
    state.next = Math.max(state.next, context.currentTime + 0.05);
    source.start(state.next);
    state.next += m / rate;
  };
  ws.onclose = (event) => {
    if (event.code !== 1000 && $("error").hidden) showError(`the stream closed (${event.code}): ${event.reason}`);
    if ($("live-state").textContent !== "done") $("live-state").textContent = `closed (${event.code})`;
    clearInterval(state.timer);
  };
}

function sendBlocks(state, planes, block, blockMs) {
  const length = planes[0].length;
  const channels = planes.length;
  const t0 = performance.now();
  let k = 0;
  const tick = () => {
    while (k * block < length && performance.now() >= t0 + k * blockMs) {
      const n = Math.min(block, length - k * block);
      const pcm = new Float32Array(n * channels);
      for (let i = 0; i < n; i++) for (let c = 0; c < channels; c++) pcm[i * channels + c] = planes[c][k * block + i];
      state.sent.push(performance.now());
      state.ws.send(pcm.buffer);
      k += 1;
    }
    if (k * block >= length) {
      clearInterval(state.timer);
      state.ws.send(JSON.stringify({ type: "end" }));
    }
  };
  state.timer = setInterval(tick, Math.max(5, blockMs / 4));
  tick();
}

function stopLive() {
  if (!live) return;
  clearInterval(live.timer);
  if (live.ws.readyState <= 1) live.ws.close(1000);
  live.context.close();
  live = null;
}

async function handle(file) {
  clearError();
  if (!file) return;
  try {
    if (!info) await loadInfo();
    if (document.querySelector("input[name=mode]:checked").value === "live") await streamLive(file);
    else await separate(file);
  } catch (e) {
    showError(e.message);
  }
}

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = ""; // picking the same file again (say, for the live mode) is a change too
  handle(file);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handle(e.dataTransfer.files[0]);
});
$("play").onclick = () => playAll();
$("stop").onclick = () => stopAll();
$("live-stop").onclick = () => stopLive();
loadInfo().catch((e) => showError(e.message));
