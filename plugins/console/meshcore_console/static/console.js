// mesh-llm console: renders /api/events (SSE) payloads; no framework, no polling, no reloads.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
// Tests read this to prove updates arrive without a reload: loadId changes only on reload.
window.meshConsole = { loadId: Math.random().toString(36).slice(2), updates: 0, last: null };

function gb(value) { return `${Number(value).toFixed(1)} GB`; }

function text(id, value) { $(id).textContent = value == null || value === "" ? "-" : value; }

function svgEl(tag, attrs, parent) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function svgText(parent, x, y, content, cls) {
  const t = svgEl("text", { x, y, "text-anchor": "middle", class: cls || "" }, parent);
  t.textContent = content;
  return t;
}

// An id cut to fit `width` px of 11px text ("…" at the end); the full id goes in a title.
function fit(value, width) {
  const max = Math.max(4, Math.floor((width - 12) / 6.4));
  return value.length <= max ? value : `${value.slice(0, max - 1)}…`;
}

// POSIX shell single quotes: nothing inside is special, and a ' becomes '\'' (close the
// quotes, an escaped quote, reopen), so a hostile model name pastes as plain text.
function shellQuote(value) {
  return `'${String(value).replace(/'/g, "'\\''")}'`;
}

function linkClass(label) {
  if (label === "RPC") return "rpc";
  if (label === "API tunnel") return "api";
  return "control";
}

// Hub (the host, or this node while there is none) on top; everyone else in rows below.
function layout(nodes, hubId) {
  const maxVram = Math.max(1, ...nodes.map((n) => n.vram));
  const size = (n) => {
    const f = n.role === "CLIENT" ? 0 : Math.sqrt(n.vram / maxVram);
    return { w: Math.round(96 + 84 * f), h: Math.round(62 + 26 * f) };
  };
  const hub = nodes.find((n) => n.id === hubId) || nodes[0];
  const others = nodes.filter((n) => n !== hub);
  const perRow = 4, width = 720, pos = {};
  pos[hub.id] = { x: width / 2, y: 20, ...size(hub) };
  others.forEach((n, i) => {
    const row = Math.floor(i / perRow);
    const inRow = Math.min(perRow, others.length - row * perRow);
    const col = i % perRow;
    pos[n.id] = { x: (width / inRow) * (col + 0.5), y: 190 + row * 130, ...size(n) };
  });
  const rows = Math.ceil(others.length / perRow);
  return { pos, height: others.length ? 190 + rows * 130 : 150 };
}

function drawTopology(p) {
  const svg = $("topology");
  svg.replaceChildren();
  const hubNode = p.nodes.find((n) => n.is_host) || p.nodes.find((n) => n.is_self);
  const hub = hubNode ? hubNode.id : p.id;
  const { pos, height } = layout(p.nodes, hub);
  svg.setAttribute("viewBox", `0 0 720 ${height}`);
  for (const l of p.links) {
    const a = pos[l.from], b = pos[l.to];
    if (!a || !b) continue;
    const g = svgEl("g", { class: "link-group", "data-from": l.from, "data-to": l.to }, svg);
    svgEl("line", { class: `link ${linkClass(l.label)}`, x1: a.x, y1: a.y + a.h,
      x2: b.x, y2: b.y }, g);
    const label = l.transport ? `${l.label} (${l.transport})` : l.label;
    // Label just above the child's box: labels of siblings spread out instead of piling
    // up near the hub, and second-row labels stay clear of the first row's boxes.
    const my = b.y - 20, t = (my - (a.y + a.h)) / Math.max(1, b.y - (a.y + a.h));
    const mx = a.x + t * (b.x - a.x);
    const lg = svgEl("g", { class: "link-label" }, g);
    svgEl("rect", { x: mx - label.length * 3.3 - 4, y: my - 10, width: label.length * 6.6 + 8,
      height: 16, rx: 3 }, lg);
    svgText(lg, mx, my + 2, label);
  }
  for (const n of p.nodes) {
    const at = pos[n.id];
    const cls = ["node", n.role, n.is_self ? "self" : "", n.share != null ? "in-split" : ""];
    const g = svgEl("g", { class: cls.join(" ").trim(), "data-id": n.id, "data-role": n.role },
      svg);
    svgEl("rect", { class: "box", x: at.x - at.w / 2, y: at.y, width: at.w, height: at.h,
      rx: 6 }, g);
    svgText(g, at.x, at.y + 17, n.role, "role");
    svgEl("title", {}, g).textContent = n.id;
    const suffix = n.is_self ? " (you)" : "";
    svgText(g, at.x, at.y + 32, fit(n.id, at.w - suffix.length * 6.4) + suffix, "id");
    const vram = n.role === "CLIENT" ? "no VRAM" : `${gb(n.vram_gb)} · ${n.serving}`;
    svgText(g, at.x, at.y + 46, vram);
    if (n.share != null) {
      svgText(g, at.x, at.y + at.h - 4, `share ${Math.round(n.share * 100)}%`, "share");
    }
  }
}

function drawPeers(p) {
  const body = $("peers").querySelector("tbody");
  body.replaceChildren();
  for (const peer of p.peers) {
    const tr = document.createElement("tr");
    tr.dataset.id = peer.id;
    const rtt = peer.rtt_ms == null ? "-" : `${peer.rtt_ms.toFixed(1)} ms`;
    const vram = peer.role === "CLIENT" ? "-" : gb(peer.vram_gb);
    for (const v of [peer.id, peer.role, vram, peer.model || "-", rtt, peer.link || "-",
      peer.serving]) {
      const td = document.createElement("td");
      const cell = document.createElement("span");
      cell.className = "cell";
      cell.textContent = v;
      cell.title = v;  // long ids and model names are cut with an ellipsis; hover shows all
      td.appendChild(cell);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  text("peer-count", `${p.peers_count} peer${p.peers_count === 1 ? "" : "s"}`);
}

// Every value a member or the network chose (model name, API address) is quoted for the
// language it is pasted into: POSIX shell single quotes, JSON string literals for Python.
function snippets(p) {
  const model = p.model || "default";
  const body = JSON.stringify({ model, messages: [{ role: "user", content: "Hello!" }] });
  const auth = p.api_key_required ? ' \\\n  -H "Authorization: Bearer $MESH_LLM_API_KEY"' : "";
  $("snippet-curl").textContent =
    `curl ${shellQuote(`${p.api_url}/chat/completions`)} \\\n` +
    `  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(body)}`;
  const key = p.api_key_required ? 'os.environ["MESH_LLM_API_KEY"]' : '"none"';
  $("snippet-python").textContent =
    (p.api_key_required ? "import os\n" : "") + "from openai import OpenAI\n\n" +
    `client = OpenAI(base_url=${JSON.stringify(p.api_url)}, api_key=${key})\n` +
    `reply = client.chat.completions.create(\n    model=${JSON.stringify(model)},\n` +
    '    messages=[{"role": "user", "content": "Hello!"}],\n)\n' +
    "print(reply.choices[0].message.content)";
}

function render(p) {
  window.meshConsole.last = p;
  text("node-id", p.id);
  const badge = $("badge");
  badge.textContent = p.badge.text;
  badge.className = `badge ${p.badge.kind}`;
  text("badge-detail", p.badge.detail);
  text("model", p.model);
  text("speculation", p.speculation);
  text("total-vram", `${gb(p.total_vram_gb)} (clients excluded)`);
  text("plan-state", p.plan_state);
  $("plan-reason").textContent = p.plan_reason || "";
  // device order (llama-server's), each share named by its node
  const split = p.plan.participants.map((x) => `${x.peer_id} ${x.share}`).join(", ");
  const server = p.server_tensor_split.length
    ? ` (llama-server --tensor-split ${p.server_tensor_split.join(",")})` : "";
  text("tensor-split", split + server);
  text("rpc-entries", p.rpc_entries.length ? p.rpc_entries.map(
    (e) => e.address ? `${e.peer_id} → ${e.address}` : e.peer_id).join(", ") : "none");
  text("api-url", p.api_url);
  snippets(p);
  $("invite").hidden = !p.join_command;
  $("join-command").textContent = p.join_command || "";
  $("token-hidden").hidden = !p.token_hidden;
  drawTopology(p);
  drawPeers(p);
  window.meshConsole.updates += 1;
  document.body.dataset.updates = String(window.meshConsole.updates);
}

function connect() {
  const conn = $("conn");
  const events = new EventSource("/api/events");
  events.addEventListener("status", (e) => render(JSON.parse(e.data)));
  events.addEventListener("heartbeat", () => { conn.textContent = "live"; });
  events.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  // EventSource reconnects by itself; just say so.
  events.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn"; };
}

// ---------------------------------------------------------------- chat

const history = [];

function addMessage(role, content) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = content;
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

function statsLine(tokens, started, firstAt, timings) {
  const parts = [`${tokens} tokens`];
  let rate = null;
  if (timings && timings.predicted_per_second) rate = timings.predicted_per_second;
  else if (firstAt && tokens > 1) rate = (tokens - 1) / ((performance.now() - firstAt) / 1000);
  if (rate != null) parts.push(`${rate.toFixed(1)} tok/s`);
  if (firstAt) parts.push(`first token ${Math.round(firstAt - started)} ms`);
  if (timings && timings.draft_n) {
    const pct = Math.round((100 * timings.draft_n_accepted) / timings.draft_n);
    parts.push(`draft ${timings.draft_n_accepted}/${timings.draft_n} accepted (${pct}%)`);
  }
  return parts.join(" · ");
}

async function readStream(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data && data !== "[DONE]") onChunk(JSON.parse(data));
    }
  }
}

async function refreshStatus() {
  try {
    const resp = await fetch("/api/status");
    if (resp.ok) render(await resp.json());
  } catch (_) { /* the event stream brings the next status anyway */ }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value.trim();
  if (!content) return;
  input.value = "";
  $("chat-send").disabled = true;
  history.push({ role: "user", content });
  addMessage("user", content);
  const out = addMessage("assistant", "");
  const started = performance.now();
  let tokens = 0, firstAt = null, timings = null, reply = "";
  try {
    const resp = await fetch("/api/chat", { method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: history, max_tokens: 256 }) });
    if (!resp.ok) {
      const body = await resp.text();
      let msg = body;
      try { const j = JSON.parse(body); msg = (j.error && (j.error.message || j.error)) || body; }
      catch (_) { /* not JSON: show as is */ }
      throw new Error(`HTTP ${resp.status}: ${msg}`);
    }
    await readStream(resp, (chunk) => {
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt == null) firstAt = performance.now();
        tokens += 1;
        reply += delta.content;
        out.textContent = reply;
      }
      if (chunk.timings) timings = chunk.timings;
      $("chat-stats").textContent = statsLine(tokens, started, firstAt, timings);
    });
    history.push({ role: "assistant", content: reply });
    $("chat-stats").textContent = statsLine(tokens, started, firstAt, timings);
    refreshStatus(); // the node's counters (speculation's acceptance) moved with this reply
  } catch (err) {
    out.className = "msg error";
    out.textContent = String(err.message || err);
    history.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

function copyButtons() {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const content = $(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(content);
        button.textContent = "copied";
      } catch (_) {
        const range = document.createRange();
        range.selectNodeContents($(button.dataset.copy));
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        button.textContent = "selected";
      }
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    });
  }
}

$("chat-form").addEventListener("submit", sendChat);
copyButtons();
connect();
