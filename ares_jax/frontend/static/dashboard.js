// The live cluster page: polls GET /cluster, keeps a few minutes of history per replica in
// memory, and redraws small canvas charts. No framework and no build step.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300;  // history shown per replica
const history = new Map();  // replica_id -> [{t, kvPct, running}]
const seenMigrations = new Set();
let firstLoad = true;

const $ = (id) => document.getElementById(id);

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtTime(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

// ---------------------------------------------------------------------------------- charts

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 130;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return {ctx, w, h};
}

// series: [{points: [[x, y]], color, axis: "left"|"right", dash}], axes: {x: [lo, hi],
// left: [lo, hi], right: [lo, hi] | null, xLabel, leftLabel, rightLabel}
function lineChart(canvas, series, axes) {
  const {ctx, w, h} = setupCanvas(canvas);
  const pad = {l: 34, r: axes.right ? 30 : 8, t: 8, b: 18};
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  const sx = (x) => pad.l + (x - axes.x[0]) / ((axes.x[1] - axes.x[0]) || 1) * pw;
  const sy = (y, r) => pad.t + ph - (y - r[0]) / ((r[1] - r[0]) || 1) * ph;
  ctx.strokeStyle = "#e5e7eb"; ctx.lineWidth = 1; ctx.font = "10px system-ui";
  ctx.fillStyle = "#6b7280";
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + ph * i / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
    const v = axes.left[1] - (axes.left[1] - axes.left[0]) * i / 4;
    ctx.fillText(String(Math.round(v)), 2, y + 3);
    if (axes.right) {
      const rv = axes.right[1] - (axes.right[1] - axes.right[0]) * i / 4;
      ctx.fillText(String(Math.round(rv)), pad.l + pw + 4, y + 3);
    }
  }
  ctx.fillText(axes.xLabel || "", pad.l, h - 4);
  if (axes.leftLabel) ctx.fillText(axes.leftLabel, pad.l + 4, pad.t + 10);
  for (const s of series) {
    const range = s.axis === "right" ? axes.right : axes.left;
    ctx.strokeStyle = s.color; ctx.lineWidth = s.width || 1.5;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([x, y], i) => {
      const px = sx(x), py = sy(y, range);
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke();
  }
  ctx.setLineDash([]);
}

// ------------------------------------------------------------------------------- replicas

function replicaCard(r) {
  let card = document.querySelector(`.replica[data-replica="${r.replica_id}"]`);
  if (card) return card;
  card = document.createElement("div");
  card.className = "replica";
  card.dataset.replica = r.replica_id;
  card.innerHTML = `
    <div class="title"><b>replica ${r.replica_id}</b><span class="muted where"></span></div>
    <div class="numbers"></div>
    <div class="charts"><canvas class="history"></canvas><canvas class="prediction"></canvas></div>`;
  $("replicas").appendChild(card);
  return card;
}

function renderReplica(r, now) {
  const card = replicaCard(r);
  const pct = r.kv_pages_total ? 100 * r.kv_pages_used / r.kv_pages_total : 0;
  card.classList.toggle("unhealthy", !r.healthy);
  card.querySelector(".where").textContent =
    `${r.role} · pid ${r.process_id} · ${r.address} · ${r.healthy ? "healthy" : "UNHEALTHY"}`;
  card.querySelector(".numbers").innerHTML =
    `<span class="running">${r.running}</span> running · KV ` +
    `<span class="kv-used">${r.kv_pages_used}</span> / ${r.kv_pages_total} pages ` +
    `(<span class="kv-pct">${pct.toFixed(1)}</span>%) · page ${r.page_size} tokens`;

  const h = history.get(r.replica_id) || [];
  h.push({t: now, kvPct: pct, running: r.running});
  while (h.length && h[0].t < now - WINDOW_S) h.shift();
  history.set(r.replica_id, h);
  const maxRun = Math.max(4, ...h.map((p) => p.running));
  // The window grows from one minute to WINDOW_S as history accumulates.
  const span = Math.min(WINDOW_S, Math.max(60, now - h[0].t));
  lineChart(card.querySelector("canvas.history"), [
    {points: h.map((p) => [p.t - now, p.kvPct]), color: "#2563eb"},
    {points: h.map((p) => [p.t - now, p.running]), color: "#f59e0b", axis: "right"},
  ], {x: [-span, 0], left: [0, 100], right: [0, maxRun],
      xLabel: `last ${Math.round(span)} s → now`, leftLabel: "KV %"});

  const pred = r.predicted_kv_pages || [];
  const horizon = pred.length ? pred[pred.length - 1][0] : 1;
  const top = Math.max(r.kv_pages_total || 1, ...pred.map((p) => p[1]));
  lineChart(card.querySelector("canvas.prediction"), [
    {points: pred, color: "#7c3aed", width: 2},
    {points: [[0, r.kv_pages_total], [horizon, r.kv_pages_total]], color: "#dc2626",
     dash: [4, 3]},
  ], {x: [0, horizon], left: [0, top * 1.05], right: null,
      xLabel: `decode steps ahead (0 → ${horizon})`, leftLabel: "pages"});
}

// ----------------------------------------------------------------------------- migrations

function renderMigrations(list) {
  const body = document.querySelector("#migrations tbody");
  $("no-migrations").style.display = list.length ? "none" : "";
  const rows = [];
  for (const m of [...list].reverse()) {
    const key = `${m.request_id}|${m.src}|${m.dst}|${m.finished_at}`;
    const fresh = !firstLoad && !seenMigrations.has(key);
    seenMigrations.add(key);
    const tr = document.createElement("tr");
    if (fresh) tr.className = "fresh";
    const downtime = m.downtime_ms == null ? "–" : `${m.downtime_ms.toFixed(1)} ms`;
    for (const [text, cls] of [[fmtTime(m.finished_at)], [m.request_id],
                                [`${m.src} → ${m.dst}`], [m.outcome, `outcome-${m.outcome}`],
                                [fmtBytes(m.bytes)], [downtime]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------- poll

function render(state) {
  const c = state.counters || {};
  $("policy").textContent = state.policy;
  $("running-total").textContent = state.running;
  $("waiting-total").textContent = state.waiting;
  $("requests-finished").textContent = c.requests_finished ?? "–";
  $("migrations-committed").textContent = c.migrations_committed ?? "–";
  $("migrations-aborted").textContent = c.migrations_aborted ?? "–";
  $("migration-bytes").textContent = fmtBytes(c.migration_bytes);
  $("preemptions").textContent = c.preemptions ?? "–";
  const now = state.time || Date.now() / 1000;
  const ids = new Set();
  for (const r of state.replicas || []) { renderReplica(r, now); ids.add(String(r.replica_id)); }
  for (const card of document.querySelectorAll(".replica")) {
    if (!ids.has(card.dataset.replica)) { card.remove(); history.delete(+card.dataset.replica); }
  }
  renderMigrations(state.migrations || []);
  firstLoad = false;
  $("status").textContent = `updated ${fmtTime(now)}`;
  $("status").dataset.updates = String(+($("status").dataset.updates || 0) + 1);
}

async function poll() {
  try {
    const res = await fetch("/cluster", {cache: "no-store"});
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
  } catch (err) {
    $("status").textContent = `cannot reach the server (${err.message}); retrying`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models");
    const body = await res.json();
    $("model").textContent = body.data.map((m) => m.id).join(", ");
  } catch (err) { /* the title is optional */ }
}

$("window-min").textContent = String(WINDOW_S / 60);
loadModel();
poll();
