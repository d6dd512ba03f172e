// The polymodal web page: a chat over the server's OpenAI-compatible API, in plain JavaScript.
//
// It talks to the server only over HTTP, as any client would: /v1/models for the models that
// chat, /v1/conversations for the chats kept on the server (the current one's id is kept in
// localStorage, so a reload finds it again), and /v1/chat/completions with "stream": true,
// read as server-sent events from a fetch body. Images go out as data: URLs, speech as WAV
// (input_audio), made here from what the microphone recorded. Whatever the server sends back
// is shown as text (textContent), images and audio; never parsed as HTML.
"use strict";

const KEY_STORE = "polymodal.apiKey";
const CONVERSATION_STORE = "polymodal.conversation";
const MODEL_STORE = "polymodal.model";
const SAMPLE_RATE = 16000; // what the server's recognisers hear

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  conversation: localStorage.getItem(CONVERSATION_STORE) || null,
  attachments: [], // {url, name}: images waiting to be sent
  recording: null, // {recorder, stream, chunks, started}
  controller: null, // the AbortController of the reply being streamed
};

// ---- talking to the server ----

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const out = {};
  if (json) out["content-type"] = "application/json";
  if (state.key) out.authorization = `Bearer ${state.key}`;
  return out;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new HTTPError(response.status, message);
}

// fetch a /v1 route; a 401 asks for the API key and tries again with it
async function request(path, options = {}) {
  let refused = false;
  for (;;) {
    const response = await fetch(`v1/${path}`, {
      ...options, headers: headers(options.body !== undefined),
    });
    if (response.status !== 401) {
      if (!response.ok) throw await errorOf(response);
      return response;
    }
    await askForKey(refused || Boolean(state.key));
    refused = true;
  }
}

async function getJSON(path) {
  return (await request(path)).json();
}

async function postJSON(path, body) {
  return (await request(path, { method: "POST", body: JSON.stringify(body) })).json();
}

let keyAsked = null; // one dialog at a time, however many requests wait for it

function askForKey(refused) {
  if (!keyAsked) {
    keyAsked = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-message").textContent = refused
        ? "The server refused that API key. Enter the right one."
        : "This server needs an API key.";
      $("key-input").value = "";
      $("key-form").onsubmit = (event) => {
        event.preventDefault();
        state.key = $("key-input").value.trim();
        localStorage.setItem(KEY_STORE, state.key);
        dialog.close();
        keyAsked = null;
        resolve();
      };
      dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
      dialog.showModal();
    });
  }
  return keyAsked;
}

// the JSON objects of a server-sent event stream, as they arrive
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
    if (done) return;
  }
}

// ---- messages on the page ----

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

// an <li> for one message: its text, its media and a line of notes below
function messageElement(role) {
  const item = element("li", `message ${role}`);
  item.append(element("div", "role", role === "user" ? "You" : "Assistant"),
    element("div", "text"), element("div", "media"), element("div", "meta"));
  $("messages").append(item);
  scrollDown();
  return item;
}

function addImage(item, url) {
  const image = element("img");
  image.src = url;
  image.alt = "image";
  image.addEventListener("click", () => window.open(url, "_blank", "noopener"));
  item.querySelector(".media").append(image);
}

function addAudio(item, bytes, autoplay) {
  const audio = element("audio");
  audio.controls = true;
  audio.src = URL.createObjectURL(new Blob([bytes], { type: audioType(bytes) }));
  item.querySelector(".media").append(audio);
  if (autoplay) audio.play().catch(() => { /* the browser wants a click first: the controls are there */ });
  return audio;
}

// which models made a reply, and how its output modality was chosen
function setMeta(item, models, route) {
  const notes = [];
  if (models && models.length) notes.push(`by ${models.join(", ")}`);
  if (route && route.modality) {
    const sure = typeof route.confidence === "number" && route.confidence < 1
      ? `, ${Math.round(route.confidence * 100)}% sure` : "";
    notes.push(`${route.modality} chosen by ${route.by || "the server"}${sure}`);
  }
  if (notes.length) item.querySelector(".meta").textContent = notes.join(" · ");
}

function setHeard(item, heard) {
  if (!item || !heard || !heard.length) return;
  const line = element("div", "heard", `heard: “${heard.join(" ")}”`);
  item.querySelector(".media").after(line);
}

// a message as the server keeps it (a request message, or a reply with audio and images)
function renderMessage(message) {
  const item = messageElement(message.role === "user" ? "user" : "assistant");
  const content = message.content;
  const texts = [];
  if (typeof content === "string") texts.push(content);
  for (const part of Array.isArray(content) ? content : []) {
    if (part.type === "text") texts.push(part.text);
    else if (part.type === "image_url") addImage(item, part.image_url.url);
    else if (part.type === "input_audio") addAudio(item, fromBase64(part.input_audio.data), false);
  }
  if (message.audio && message.audio.data) {
    if (!texts.length && message.audio.transcript) texts.push(message.audio.transcript);
    addAudio(item, fromBase64(message.audio.data), false);
  }
  for (const image of message.images || []) addImage(item, image.image_url.url);
  item.querySelector(".text").textContent = texts.join("\n");
  setMeta(item, message.models);
  item.dataset.state = "done";
  return item;
}

// ---- bytes ----

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function concat(pieces) {
  const out = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const piece of pieces) {
    out.set(piece, at);
    at += piece.length;
  }
  return out;
}

// the media type of encoded audio, from its first bytes (raw 16-bit PCM gets a WAV header)
function audioType(bytes) {
  const head = String.fromCharCode(...bytes.slice(0, 4));
  if (head === "RIFF") return "audio/wav";
  if (head === "OggS") return "audio/ogg";
  if (head === "fLaC") return "audio/flac";
  if (head.startsWith("ID3") || (bytes[0] === 0xff && (bytes[1] & 0xe0) === 0xe0)) {
    return (bytes[1] & 0x06) === 0 ? "audio/aac" : "audio/mpeg"; // ADTS has layer 0, MP3 layer 3
  }
  return "audio/wav";
}

function wavBytes(samples, rate) {
  const out = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); out.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const x = Math.max(-1, Math.min(1, samples[i]));
    out.setInt16(44 + i * 2, x < 0 ? x * 0x8000 : x * 0x7fff, true);
  }
  return new Uint8Array(out.buffer);
}

// what MediaRecorder made (WebM/Opus in Chromium, MP4 elsewhere) as 16 kHz mono WAV: decoding
// in an OfflineAudioContext at 16 kHz resamples, and the channels are averaged
async function recordingAsWav(blob) {
  const decoder = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  const decoded = await decoder.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
  }
  return wavBytes(mono, decoded.sampleRate);
}

// ---- sending ----

function wanted() {
  const replyAs = $("reply-as").value;
  const audio = { voice: $("voice").value, format: "wav" };
  if (replyAs === "text") return { modalities: ["text"] };
  if (replyAs === "image") return { modalities: ["image", "text"] };
  if (replyAs === "speech") return { modalities: ["text", "audio"], audio };
  return { audio }; // auto: the server decides; if it speaks, in this voice
}

async function ensureConversation() {
  if (!state.conversation) {
    const created = await postJSON("conversations", {});
    useConversation(created.id);
  }
  return state.conversation;
}

function useConversation(id) {
  state.conversation = id;
  if (id) localStorage.setItem(CONVERSATION_STORE, id);
  else localStorage.removeItem(CONVERSATION_STORE);
  for (const item of $("conversations").children) item.classList.toggle("current", item.dataset.id === id);
}

async function send(wav) {
  if (state.controller) return;
  const text = $("input").value.trim();
  const images = state.attachments.slice();
  if (!text && !images.length && !wav) return;
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (wav) parts.push({ type: "input_audio", input_audio: { data: wav.base64, format: "wav" } });
  if (text) parts.push({ type: "text", text });
  const content = parts.length === 1 && text ? text : parts;

  notice("");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let mine = null;
  let reply = null;
  try {
    await ensureConversation();
    mine = renderMessage({ role: "user", content });
    $("input").value = "";
    state.attachments = [];
    showAttachments();
    reply = messageElement("assistant");
    reply.dataset.state = "streaming";
    const response = await request("chat/completions", {
      method: "POST", signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value || "assistant", stream: true, conversation: state.conversation,
        messages: [{ role: "user", content }], ...wanted(),
      }),
    });
    await readReply(response, reply, mine);
    reply.dataset.state = "done";
  } catch (error) {
    if (reply) {
      reply.dataset.state = "error";
      reply.classList.add("error");
      if (!reply.querySelector(".text").textContent) {
        reply.querySelector(".text").textContent = error.name === "AbortError" ? "(stopped)" : error.message;
      }
    }
    if (error.name !== "AbortError") notice(error.message);
    if (!mine) { // nothing was sent: give the message back to edit
      $("input").value = text;
      state.attachments = images;
      showAttachments();
    }
  } finally {
    state.controller = null;
    setBusy(false);
    loadConversations().catch(() => {});
  }
}

// a streamed reply into its <li>: text as it comes, then images, audio and which models made it
async function readReply(response, item, mine) {
  const text = item.querySelector(".text");
  const audio = { pieces: [], transcript: "" };
  let chunks = 0;
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    chunks += 1;
    item.dataset.chunks = String(chunks);
    const choice = (chunk.choices || [])[0];
    const delta = (choice && choice.delta) || {};
    if (delta.content) {
      text.textContent += delta.content;
      scrollDown();
    }
    for (const image of delta.images || []) addImage(item, image.image_url.url);
    if (delta.audio) {
      if (delta.audio.data) audio.pieces.push(fromBase64(delta.audio.data));
      if (delta.audio.transcript) audio.transcript += delta.audio.transcript;
    }
    if (chunk.polymodal) {
      setMeta(item, chunk.polymodal.models, chunk.polymodal.route);
      setHeard(mine, chunk.polymodal.heard);
    }
  }
  if (audio.pieces.length) {
    if (!text.textContent) text.textContent = audio.transcript;
    addAudio(item, concat(audio.pieces), true);
  }
  scrollDown();
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Send";
  $("send").classList.toggle("busy", busy);
  $("record").disabled = busy;
}

// ---- images: the button, drag and drop, paste ----

async function attach(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  if (files.length && !images.length) {
    notice("Only images can be attached (audio: use Record).");
    return;
  }
  for (const file of images) state.attachments.push({ url: await readAsDataURL(file), name: file.name });
  showAttachments();
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((image, index) => {
    const thumb = element("figure", "thumbnail");
    const picture = element("img");
    picture.src = image.url;
    picture.alt = image.name || "image";
    const remove = element("button", "remove", "×");
    remove.type = "button";
    remove.title = "Remove this image";
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      showAttachments();
    });
    thumb.append(picture, remove);
    box.append(thumb);
  });
}

function hasFiles(event) {
  return event.dataTransfer && [...event.dataTransfer.types].includes("Files");
}

// ---- the microphone ----

function recordingProblem() {
  if (!window.isSecureContext) {
    return "The microphone only works in a secure context: open this page over https, or on this machine " +
      `at http://localhost:${location.port || 80}/ or http://127.0.0.1:${location.port || 80}/ ` +
      `(it is now at ${location.origin}, which the browser does not trust with a microphone).`;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser cannot record: it has no navigator.mediaDevices.getUserMedia.";
  }
  if (!window.MediaRecorder) return "This browser cannot record: it has no MediaRecorder.";
  return null;
}

async function toggleRecording() {
  if (state.recording) return stopRecording();
  const problem = recordingProblem();
  if (problem) {
    notice(problem);
    return;
  }
  let stream;
  try {
    // the recogniser wants the voice as it was spoken: no gain riding (it clips), no noise gate
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
  } catch (error) {
    notice(`The microphone could not be opened: ${error.message || error.name}`);
    return;
  }
  const recorder = new MediaRecorder(stream, { audioBitsPerSecond: 128000 });
  const recording = { recorder, stream, chunks: [], started: Date.now() };
  recorder.ondataavailable = (event) => { if (event.data.size) recording.chunks.push(event.data); };
  recorder.start();
  state.recording = recording;
  notice("");
  $("record").textContent = "Stop and send";
  $("record").classList.add("recording");
  recording.timer = setInterval(() => {
    $("record").textContent = `Stop and send (${Math.round((Date.now() - recording.started) / 1000)} s)`;
  }, 500);
}

async function stopRecording() {
  const recording = state.recording;
  state.recording = null;
  clearInterval(recording.timer);
  $("record").textContent = "Record";
  $("record").classList.remove("recording");
  await new Promise((resolve) => {
    recording.recorder.onstop = resolve;
    recording.recorder.stop();
  });
  recording.stream.getTracks().forEach((track) => track.stop());
  try {
    const blob = new Blob(recording.chunks, { type: recording.recorder.mimeType });
    if (!blob.size) throw new Error("nothing was recorded");
    const wav = await recordingAsWav(blob);
    const url = await readAsDataURL(new Blob([wav], { type: "audio/wav" }));
    await send({ base64: url.slice(url.indexOf(",") + 1) });
  } catch (error) {
    notice(`The recording could not be sent: ${error.message}`);
  }
}

// ---- models and conversations ----

async function loadModels() {
  const listing = await getJSON("models");
  const select = $("model");
  const chatting = listing.data.filter((m) => (m.capabilities || []).includes("chat.completions"));
  chatting.sort((a, b) => (b.id === "assistant") - (a.id === "assistant") || a.id.localeCompare(b.id));
  select.replaceChildren(...chatting.map((m) => {
    const option = element("option", "", m.id);
    option.value = m.id;
    option.title = `reads ${(m.input_modalities || []).join(", ")}; writes ${(m.output_modalities || []).join(", ")}`;
    return option;
  }));
  const kept = localStorage.getItem(MODEL_STORE);
  if (kept && chatting.some((m) => m.id === kept)) select.value = kept;
  if (!chatting.length) notice("This server has no model that chats.");
}

async function loadConversations() {
  const listing = await getJSON("conversations?limit=100");
  const list = $("conversations");
  list.replaceChildren(...listing.data.map((conversation) => {
    const item = element("li");
    item.dataset.id = conversation.id;
    item.classList.toggle("current", conversation.id === state.conversation);
    const open = element("button", "open", conversation.title ||
      `Chat of ${new Date(conversation.created_at * 1000).toLocaleString()}`);
    open.type = "button";
    open.addEventListener("click", () => openConversation(conversation.id));
    const remove = element("button", "remove", "×");
    remove.type = "button";
    remove.title = "Delete this conversation";
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    item.append(open, remove);
    return item;
  }));
}

async function openConversation(id) {
  if (state.controller) return;
  $("messages").replaceChildren();
  notice("");
  useConversation(id);
  if (!id) return;
  try {
    const listing = await getJSON(`conversations/${encodeURIComponent(id)}/messages?limit=1000`);
    let lastUser = null;
    for (const message of listing.data) {
      const item = renderMessage(message);
      if (message.role === "user") lastUser = item;
      else setHeard(lastUser, message.heard);
    }
    scrollDown();
  } catch (error) {
    if (error.status === 404) useConversation(null); // deleted elsewhere: start afresh
    else notice(error.message);
  }
}

async function deleteConversation(id) {
  if (!window.confirm("Delete this conversation?")) return;
  try {
    await request(`conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (id === state.conversation) await openConversation(null);
    await loadConversations();
  } catch (error) {
    notice(error.message);
  }
}

// ---- wiring ----

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) state.controller.abort();
    else send(null);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!state.controller) send(null);
    }
  });
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", async () => {
    await attach($("file").files);
    $("file").value = "";
  });
  $("record").addEventListener("click", toggleRecording);
  $("new-chat").addEventListener("click", () => openConversation(null));
  $("model").addEventListener("change", () => localStorage.setItem(MODEL_STORE, $("model").value));

  const overlay = $("drop-overlay");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) overlay.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    overlay.hidden = true;
    if (!hasFiles(event)) return;
    event.preventDefault();
    attach(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? [...event.clipboardData.files] : [];
    if (!files.length) return; // text: pasted as usual
    event.preventDefault();
    attach(files);
  });
  if (recordingProblem()) $("record").title = recordingProblem();
}

async function start() {
  wire();
  try {
    await loadModels();
    await loadConversations();
    await openConversation(state.conversation);
  } catch (error) {
    notice(`The server could not be reached: ${error.message}`);
  }
  document.body.dataset.ready = "true";
}

start();
