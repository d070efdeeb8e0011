// pippin playground: lists models from /v1/models, streams /v1/chat/completions over SSE with fetch,
// and shows time to first token and tokens per second while the reply arrives. An API key (for a server started
// with --api-key) is kept in this browser's localStorage and sent as a bearer token. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "pippin-api-key";

function authHeaders() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function needKey() {
  $("status").textContent = "this server needs an API key: enter it under Server";
  $("api_key").focus();
}
const history = []; // {role, content} of the conversation so far
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    if (r.status === 401) return needKey();
    const data = await r.json();
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.parent ? `${m.parent} + ${m.id.slice(m.parent.length + 1)}` : `${m.id} (base)`;
      sel.append(opt);
    }
    $("status").textContent = `${data.data.length} model(s)`;
  } catch (e) {
    $("status").textContent = `cannot reach the server: ${e}`;
  }
}

function settings() {
  const body = {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  const stop = $("stop_strings").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop.slice(0, 4);
  return body;
}

function showStats({ ttft, toks, ntok, finish }) {
  if (ttft !== undefined) $("ttft").textContent = `${Math.round(ttft)} ms`;
  if (toks !== undefined) $("toks").textContent = toks.toFixed(1);
  if (ntok !== undefined) $("ntok").textContent = String(ntok);
  if (finish !== undefined) $("finish").textContent = finish;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true, continuous_usage_stats: true }, ...settings() };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  showStats({ ttft: NaN, toks: 0, ntok: 0, finish: "…" });
  $("ttft").textContent = "…";
  const t0 = performance.now();
  let tFirst = null;
  let nFirst = 0;
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (r.status === 401) needKey();
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(err.error ? err.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        // a chunk may carry several tokens' text: count tokens from the usage on every chunk
        const ntok = ev.usage ? ev.usage.completion_tokens : undefined;
        if (ntok !== undefined) showStats({ ntok });
        for (const c of ev.choices || []) {
          if (c.delta && c.delta.content) {
            if (tFirst === null) {
              tFirst = performance.now();
              nFirst = ntok || 1;
              showStats({ ttft: tFirst - t0 });
            }
            reply += c.delta.content;
            out.textContent = reply;
            out.parentElement.scrollIntoView({ block: "end" });
            const secs = (performance.now() - tFirst) / 1000;
            if (secs > 0 && ntok > nFirst) showStats({ toks: (ntok - nFirst) / secs });
          }
          if (c.finish_reason) showStats({ finish: c.finish_reason });
        }
      }
    }
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      showStats({ finish: "stopped" });
      history.push({ role: "assistant", content: reply });
    } else {
      showStats({ finish: "error" });
      out.parentElement.classList.add("error");
      out.textContent = reply + (reply ? "\n" : "") + `Error: ${e.message}`;
      history.pop();
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").innerHTML = "";
});
$("api_key").value = localStorage.getItem(KEY_STORE) || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, $("api_key").value.trim());
  loadModels();
});
loadModels();
