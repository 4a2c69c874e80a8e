// moeserve's built-in page: a chat playground (streamed from v1/chat/completions) and a live
// map of the experts (polled from ui/stats). Plain JS, no dependencies. URLs are relative so
// the page works from / and /ui alike, and under a proxy's path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} of the conversation so far
let modelName = null;
let controller = null; // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text) {
  $("status").textContent = text || "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (_) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) {
      setStatus(resp.status === 401 ? "enter the server's API key" : await errorText(resp));
      return;
    }
    const card = (await resp.json()).data[0];
    modelName = card.id;
    $("model").textContent = card.id;
    $("ctx").textContent = card.max_model_len != null ? card.max_model_len : "?";
    setStatus("");
  } catch (e) {
    setStatus("server unreachable");
  }
}

// ---------------------------------------------------------------------------- chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    div.appendChild(meta);
  }
  meta.textContent = text;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    model: modelName || undefined,
    messages: messages.concat(conversation),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("ignore-eos").checked) body.ignore_eos = true;
  return body;
}

// Yields the JSON payload of each SSE `data:` line of a streamed response.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  if (!modelName) await loadModel();
  $("prompt").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".text");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const start = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  let reply = "";
  const figures = (stopped) => {
    const now = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const parts = [];
    if (first !== null) parts.push("TTFT " + (first - start).toFixed(0) + " ms");
    parts.push(tokens + " tokens");
    if (first !== null && now > first && tokens > 1) {
      parts.push(((tokens - 1) / ((now - first) / 1000)).toFixed(1) + " tok/s");
    }
    if (stopped) parts.push("stopped");
    else if (finish) parts.push("finish: " + finish);
    return parts.join(" · ");
  };
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta) {
          if (first === null) first = performance.now();
          chunks += 1;
          reply += delta;
          out.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      setMeta(div, figures(false));
    }
    setMeta(div, figures(false));
    div.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      setMeta(div, figures(true));
      div.dataset.done = "stopped";
    } else {
      div.classList.add("error");
      setMeta(div, String(e.message || e));
      div.dataset.done = "error";
    }
  } finally {
    conversation.push({ role: "assistant", content: reply });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  // Aborting the fetch closes the connection; the server aborts the request on disconnect.
  if (controller) controller.abort();
}

// ---------------------------------------------------------------------- expert map
let lastMap = null;

function drawHeatmap(stats) {
  const canvas = $("heatmap");
  const rows = stats.expert_tokens;
  const nL = rows.length;
  const nE = stats.num_experts;
  const label = 40; // px of layer labels on the left
  const top = nE <= 64 ? 16 : 4; // expert numbers on top when they fit
  const cw = Math.max(1, Math.floor((canvas.width - label) / Math.max(1, nE)));
  const ch = Math.max(4, Math.min(36, Math.floor(480 / Math.max(1, nL))));
  canvas.height = top + ch * nL;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#0c1014";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#8b96a1";
  ctx.textBaseline = "middle";
  if (nE <= 64) {
    ctx.textAlign = "center";
    for (let e = 0; e < nE; e++) ctx.fillText(String(e), label + e * cw + cw / 2, top / 2);
  }
  ctx.textAlign = "right";
  for (let l = 0; l < nL; l++) {
    const row = rows[l];
    const max = Math.max(1, ...row);
    ctx.fillStyle = "#8b96a1";
    if (ch >= 9) ctx.fillText("L" + stats.layers[l], label - 4, top + l * ch + ch / 2);
    for (let e = 0; e < nE; e++) {
      const v = row[e] / max;
      // dark blue for idle, through teal to bright yellow for the layer's busiest expert
      ctx.fillStyle = row[e] ? `hsl(${200 - 150 * v}, 90%, ${14 + 46 * v}%)` : "#151c23";
      ctx.fillRect(label + e * cw, top + l * ch, Math.max(1, cw - 1), Math.max(1, ch - 1));
    }
  }
  canvas.dataset.counts = JSON.stringify(rows);
  canvas.dataset.total = String(rows.reduce((s, r) => s + r.reduce((a, b) => a + b, 0), 0));
  lastMap = { stats, label, top, cw, ch };
}

function hover(event) {
  if (!lastMap) return;
  const { stats, label, top, cw, ch } = lastMap;
  const canvas = $("heatmap");
  const scale = canvas.width / canvas.getBoundingClientRect().width;
  const x = event.offsetX * scale - label;
  const y = event.offsetY * scale - top;
  const e = Math.floor(x / cw);
  const l = Math.floor(y / ch);
  if (x < 0 || y < 0 || e >= stats.num_experts || l >= stats.layers.length) {
    $("hover").textContent = "\u00a0";
    return;
  }
  const n = stats.expert_tokens[l][e];
  $("hover").textContent = `layer ${stats.layers[l]}, expert ${e}: ${n} tokens in the window`;
}

function showCache(rows) {
  const table = $("cache");
  table.hidden = !rows;
  if (!rows) return;
  const body = table.querySelector("tbody");
  body.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    const hit = r.hit_rate == null ? "–" : (100 * r.hit_rate).toFixed(1) + " %";
    for (const cell of [r.layer, r.resident + " / " + r.slots, hit]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

let polling = true; // false while the server refuses the key

async function poll() {
  polling = true;
  const sent = headers();
  try {
    const resp = await fetch("ui/stats", { headers: sent, cache: "no-store" });
    if (resp.ok) {
      const s = await resp.json();
      const v = s.serving;
      $("running").textContent = v.running;
      $("waiting").textContent = v.waiting;
      $("kv").textContent = (100 * v.kv_cache_usage).toFixed(1) + " %";
      $("gen-rate").textContent = v.generation_tokens_per_s.toFixed(1);
      $("prompt-rate").textContent = v.prompt_tokens_per_s.toFixed(1);
      if (s.window_seconds > 0) $("window").textContent = s.window_seconds.toFixed(0);
      if (modelName === null) {
        modelName = s.model;
        $("model").textContent = s.model;
        $("ctx").textContent = s.max_model_len;
      }
      drawHeatmap(s);
      showCache(s.expert_cache);
      $("heatmap").dataset.polls = String(Number($("heatmap").dataset.polls || 0) + 1);
    } else if (resp.status === 401) {
      // Wait for a key instead of asking every second: each refusal counts in /metrics.
      setStatus("enter the server's API key");
      polling = headers().Authorization !== sent.Authorization; // the key changed meanwhile
    }
  } catch (_) {
    // the server is restarting or gone; the next poll tries again
  } finally {
    if (polling) setTimeout(poll, 1000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const saved = sessionStorage.getItem("moeserve-api-key");
  if (saved) $("apikey").value = saved;
  $("apikey").addEventListener("change", () => {
    sessionStorage.setItem("moeserve-api-key", $("apikey").value.trim());
    loadModel();
    if (!polling) poll();
  });
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    conversation.length = 0;
    $("messages").textContent = "";
  });
  $("heatmap").addEventListener("mousemove", hover);
  loadModel();
  poll();
});
