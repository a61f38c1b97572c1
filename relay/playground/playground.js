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
  const speech = await fetch("/v1/audio/models", { headers: headers(false) });
  if (speech.ok) {
    kinds = Object.fromEntries((await speech.json()).data.map((m) => [m.id, m]));
    const roots = [...new Set(Object.values(kinds).map((m) => m.root))];
    $("models").textContent = "Models: " + roots.map((root) => {
      const names = Object.values(kinds).filter((m) => m.root === root).map((m) => m.id).filter((id) => id !== root);
      const what = kinds[root].any_voice ? "voices described in words" : kinds[root].clones ? "speaks your own voices" : "built-in voices";
      return `${root}${names.length ? ` (also ${names.join(", ")})` : ""}: ${what}`;
    }).join("; ");
    describeInstructions();
  }
  const voices = await fetch("/v1/audio/voices", { headers: headers(false) });
  if (!voices.ok) {
    message.textContent = await errorText(voices);
    return;
  }
  const entries = (await voices.json()).data;
  fill($("voice"), entries.map((v) => v.id));
  $("voice-list").replaceChildren(...entries.map(voiceItem));
}

let kinds = {};  // model id -> what /v1/audio/models says of it

// A VoiceDesign model takes the voice as a description; the others a style, if anything.
function describeInstructions() {
  const designed = kinds[$("model").value] && kinds[$("model").value].any_voice;
  $("instructions-label").textContent = designed ? "Describe the voice" : "Instructions";
  $("instructions").placeholder = designed ? "e.g. a warm, low voice, speaking slowly" : "optional: a style";
}

function voiceItem(voice) {
  const item = document.createElement("li");
  const label = document.createElement("span");
  label.textContent = `${voice.name} (${voice.type}; ${voice.models.join(", ")})`;
  item.append(label);
  if (voice.type === "audio_sample") {
    const use = button("Use", () => {
      $("voice").value = voice.id;
      if (voice.model) $("model").value = voice.model;
    });
    const remove = button("Delete", async () => {
      const response = await fetch(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE", headers: headers(false) });
      $("voice-result").textContent = response.ok ? `Deleted ${voice.name}.` : `Not deleted: ${await errorText(response)}`;
      loadLists();
    });
    item.append(" ", use, " ", remove);
  }
  return item;
}

function button(text, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
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
  const streamed = format === "mp3" && window.MediaSource && MediaSource.isTypeSupported("audio/mpeg") ? await mediaStream("audio/mpeg") : null;
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
      if (streamed) await streamed.push(value);
    }
    if (streamed) await streamed.end();
  } catch (e) {
    result.textContent = "The stream failed before its end.";
    result.className = "error";
    return;
  }
  const seconds = (performance.now() - started) / 1000;
  const blob = new Blob(parts, { type: response.headers.get("content-type") || "application/octet-stream" });
  if (!player && !streamed) {
    const audio = $("player");
    audio.hidden = false;
    audio.src = URL.createObjectURL(blob);
    audio.play().catch(() => {});
  }
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

// Compressed audio played as it arrives: Media Source Extensions feed the page's player.
async function mediaStream(type) {
  const media = new MediaSource();
  const audio = $("player");
  audio.hidden = false;
  audio.src = URL.createObjectURL(media);
  await new Promise((resolve) => media.addEventListener("sourceopen", resolve, { once: true }));
  const buffer = media.addSourceBuffer(type);
  const appended = () => new Promise((resolve) => buffer.addEventListener("updateend", resolve, { once: true }));
  let started = false;
  return {
    async push(bytes) {
      buffer.appendBuffer(bytes);
      await appended();
      if (!started) {
        started = true;
        audio.play().catch(() => {});
      }
    },
    async end() {
      if (media.readyState === "open") media.endOfStream();
    },
  };
}

// --- live text: /v1/audio/speech/stream, continuous mode ----------------------------------------

class LiveSession {
  constructor(onAudio, onMessage) {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/audio/speech/stream`;
    // A browser cannot set headers on a websocket: the key goes as a subprotocol, never in the URL.
    const protocols = key() ? ["realtime", `openai-insecure-api-key.${key()}`] : ["realtime"];
    this.socket = new WebSocket(url, protocols);
    this.socket.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.socket.addEventListener("open", resolve, { once: true });
      this.socket.addEventListener("error", () => reject(new Error("The live connection was refused (is the key right?).")), { once: true });
    });
    this.closed = new Promise((resolve) => this.socket.addEventListener("close", resolve, { once: true }));
    this.socket.addEventListener("message", (event) => {
      if (event.data instanceof ArrayBuffer) onAudio(new Uint8Array(event.data));
      else onMessage(JSON.parse(event.data));
    });
  }

  async start() {
    await this.opened;
    this.send({ type: "session.config", model: $("model").value, voice: $("voice").value, response_format: "pcm", split_granularity: "continuous" });
  }

  send(message) {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  write(text) {
    if (text) this.send({ type: "input.text", text });
  }

  done() {
    this.send({ type: "input.done" });
  }

  close() {
    this.send({ type: "session.close" });
  }
}

let live = null;

async function openLive() {
  if (live) live.close();
  const result = $("live-result");
  const player = new PcmPlayer();
  const started = performance.now();
  const session = new LiveSession(
    (bytes) => {
      if (!result.dataset.firstAudio) result.dataset.firstAudio = ((performance.now() - started) / 1000).toFixed(3);
      player.push(bytes);
      result.dataset.samples = String(player.samples);
      result.textContent = `Speaking: first audio after ${result.dataset.firstAudio} s; ${(player.samples / SAMPLE_RATE).toFixed(1)} s of audio so far.`;
    },
    (event) => {
      if (event.type === "error") {
        result.textContent = `Error: ${event.message}`;
        result.className = "error";
      } else if (event.type === "session.done") {
        result.textContent += " Done.";
      }
    },
  );
  result.className = "";
  result.textContent = "Connecting…";
  delete result.dataset.firstAudio;
  delete result.dataset.lastWord;
  result.dataset.samples = "0";
  try {
    await session.start();
  } catch (e) {
    result.textContent = e.message;
    result.className = "error";
    return null;
  }
  result.textContent = "Listening for text…";
  live = session;
  return { session, started };
}

async function startTyping() {
  const opened = await openLive();
  if (!opened) return;
  const area = $("live-text");
  let sent = area.value.length;
  opened.session.write(area.value);
  area.oninput = () => {
    if (area.value.length > sent) opened.session.write(area.value.slice(sent));
    sent = area.value.length;
  };
  area.focus();
}

async function playAsLlm() {
  const opened = await openLive();
  if (!opened) return;
  const words = ($("live-text").value.trim() || $("text").value).split(/(?<=\s)/);
  const pause = 1000 / Number($("live-pace").value || 5);
  for (const word of words) {
    opened.session.write(word);
    await new Promise((resolve) => setTimeout(resolve, pause));
  }
  $("live-result").dataset.lastWord = ((performance.now() - opened.started) / 1000).toFixed(3);
  opened.session.done();
}

function stopLive() {
  if (live) live.done();
  $("live-text").oninput = null;
}

// --- own voices: a sample and a consent, recorded here or uploaded ---------------------------------

const recordings = { sample: null, consent: null };

async function record(which, buttonId) {
  const control = $(buttonId);
  if (control.recorder) {
    control.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    $("voice-result").textContent = "No microphone, or no permission to use it.";
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((track) => track.stop());
    recordings[which] = new File(chunks, `${which}.webm`, { type: recorder.mimeType || "audio/webm" });
    control.recorder = null;
    control.textContent = `Record the ${which} again`;
    $("voice-result").textContent = `The ${which} is recorded.`;
  });
  recorder.start();
  control.recorder = recorder;
  control.textContent = "Stop recording";
}

async function saveVoice() {
  const result = $("voice-result");
  const sample = $("sample-file").files[0] || recordings.sample;
  const consentRecording = $("consent-file").files[0] || recordings.consent;
  if (!sample || !consentRecording) {
    result.textContent = "Record or upload both the sample and the consent first.";
    return;
  }
  const name = $("new-voice-name").value.trim() || "My voice";
  result.textContent = "Saving…";
  const consentForm = new FormData();
  consentForm.append("name", name);
  consentForm.append("language", navigator.language || "en-US");
  consentForm.append("recording", consentRecording);
  const consent = await fetch("/v1/audio/voice_consents", { method: "POST", headers: headers(false), body: consentForm });
  if (!consent.ok) {
    result.textContent = `The consent was not kept: ${await errorText(consent)}`;
    return;
  }
  const voiceForm = new FormData();
  voiceForm.append("name", name);
  voiceForm.append("consent", (await consent.json()).id);
  voiceForm.append("audio_sample", sample);
  if ($("new-voice-words").value.trim()) voiceForm.append("ref_text", $("new-voice-words").value.trim());
  const voice = await fetch("/v1/audio/voices", { method: "POST", headers: headers(false), body: voiceForm });
  if (!voice.ok) {
    result.textContent = `The voice was not kept: ${await errorText(voice)}`;
    return;
  }
  const saved = await voice.json();
  result.textContent = `Saved ${saved.name}: pick it above and press Speak.`;
  result.dataset.voice = saved.id;
  await loadLists();
  $("voice").value = saved.id;
  if (saved.model) $("model").value = saved.model;
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
  $("model").addEventListener("change", describeInstructions);
  $("live-start").addEventListener("click", startTyping);
  $("live-play").addEventListener("click", playAsLlm);
  $("live-stop").addEventListener("click", stopLive);
  $("record-sample").addEventListener("click", () => record("sample", "record-sample"));
  $("record-consent").addEventListener("click", () => record("consent", "record-consent"));
  $("save-voice").addEventListener("click", saveVoice);
  showStatus();
  if (remembered) loadLists();
  else $("key-message").textContent = "Type the relay's API key (empty if it needs none), then press Use this key.";
});
