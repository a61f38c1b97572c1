// The relay's playground: everything it shows comes from the relay's own API, with the key the
// person types (sent as a bearer header, never in a URL), and is rendered as text.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "qwen3-tts-relay-key";
const SAMPLE_RATE = 24000;

function key() {
  return $("key").value.trim();
}

function headers(json) {
  const h = {};
  if (key()) h["Authorization"] = "Bearer " + key();
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function fill(select, names) {
  const kept = select.value;
  select.replaceChildren(...names.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    return option;
  }));
  if (names.includes(kept)) select.value = kept;
}

async function showStatus() {
  const status = $("status");
  try {
    const ready = await (await fetch("/ready")).json();
    status.textContent = ready.status === "ready"
      ? `Relay ready: ${ready.nodes} node${ready.nodes === 1 ? "" : "s"} connected.`
      : `Relay up, but ${ready.status}.`;
    status.className = ready.status === "ready" ? "good" : "bad";
  } catch (e) {
    status.textContent = "The relay does not answer.";
    status.className = "bad";
  }
}

async function loadLists() {
  const message = $("key-message");
  message.textContent = "";
  const models = await fetch("/v1/models", { headers: headers(false) });
  if (!models.ok) {
    message.textContent = models.status === 401 ? `The key was refused (${await errorText(models)})` : await errorText(models);
    return;
  }
  fill($("model"), (await models.json()).data.map((m) => m.id));
  const voices = await fetch("/v1/audio/voices", { headers: headers(false) });
  if (!voices.ok) {
    message.textContent = await errorText(voices);
    return;
  }
  const entries = (await voices.json()).data;
  fill($("voice"), entries.map((v) => v.id));
  $("voice-list").replaceChildren(...entries.map((v) => {
    const item = document.createElement("li");
    item.textContent = `${v.name} (${v.type}; ${v.models.join(", ")})`;
    return item;
  }));
}

// Raw 16-bit PCM, played as it arrives: each chunk is scheduled right after the previous one.
class PcmPlayer {
  constructor() {
    this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
    this.next = 0;
    this.carry = null;
    this.samples = 0;
  }

  push(bytes) {
    if (this.carry) {
      const joined = new Uint8Array(this.carry.length + bytes.length);
      joined.set(this.carry);
      joined.set(bytes, this.carry.length);
      bytes = joined;
      this.carry = null;
    }
    const whole = bytes.length - (bytes.length % 2);
    if (whole < bytes.length) this.carry = bytes.slice(whole);
    if (!whole) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, whole);
    const buffer = this.context.createBuffer(1, whole / 2, SAMPLE_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < whole / 2; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.samples += whole / 2;
  }
}

async function speak() {
  const result = $("speak-result");
  const format = $("format").value;
  result.className = "";
  result.textContent = "Speaking…";
  const body = { model: $("model").value, voice: $("voice").value, input: $("text").value, response_format: format, speed: Number($("speed").value) };
  if ($("instructions").value.trim()) body.instructions = $("instructions").value.trim();
  const started = performance.now();
  let response;
  try {
    response = await fetch("/v1/audio/speech", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  } catch (e) {
    result.textContent = "The relay does not answer.";
    result.className = "error";
    return;
  }
  if (!response.ok) {
    result.textContent = `Not spoken: ${await errorText(response)}`;
    result.className = "error";
    return;
  }
  const player = format === "pcm" ? new PcmPlayer() : null;
  const parts = [];
  let first = null;
  let bytes = 0;
  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (first === null) first = (performance.now() - started) / 1000;
      bytes += value.length;
      parts.push(value);
      if (player) player.push(value);
    }
  } catch (e) {
    result.textContent = "The stream failed before its end.";
    result.className = "error";
    return;
  }
  const seconds = (performance.now() - started) / 1000;
  const blob = new Blob(parts, { type: response.headers.get("content-type") || "application/octet-stream" });
  if (!player) new Audio(URL.createObjectURL(blob)).play().catch(() => {});
  const audioSeconds = player ? player.samples / SAMPLE_RATE : null;
  result.dataset.samples = player ? String(player.samples) : "";
  result.textContent = `First audio after ${first.toFixed(2)} s; ${bytes} bytes in ${seconds.toFixed(2)} s`
    + (audioSeconds ? `; ${audioSeconds.toFixed(2)} s of audio (real-time factor ${(seconds / audioSeconds).toFixed(2)})` : "");
  const link = $("download");
  link.href = URL.createObjectURL(blob);
  link.download = `speech.${format}`;
  link.textContent = `Download speech.${format}`;
  link.hidden = false;
}

function connect() {
  if ($("remember").checked) localStorage.setItem(KEY_STORE, key());
  else localStorage.removeItem(KEY_STORE);
  loadLists();
}

document.addEventListener("DOMContentLoaded", () => {
  const remembered = localStorage.getItem(KEY_STORE);
  if (remembered) {
    $("key").value = remembered;
    $("remember").checked = true;
  }
  $("connect").addEventListener("click", connect);
  $("speak").addEventListener("click", speak);
  showStatus();
  if (remembered) loadLists();
  else $("key-message").textContent = "Type the relay's API key (empty if it needs none), then press Use this key.";
});
