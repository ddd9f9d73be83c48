// nextserve's dashboard, written by hand: polls /dashboard/data every second, keeps five minutes
// of snapshots, and derives rates and latency percentiles from the differences between them
// (as PromQL's rate() and histogram_quantile() would), then draws the expert-load heatmap.
"use strict";
const POLL_MS = 1000, WINDOW_S = 300, LATENCY_WINDOW_S = 60;
const history = [];  // {t, data}

function fmt(x, digits = 1) { return x == null || !isFinite(x) ? "–" : x.toFixed(digits); }
function fmtSeconds(s) { return s == null || !isFinite(s) ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s"; }

function snapshotAgo(seconds) {
  const now = history[history.length - 1].t;
  for (const h of history) if (now - h.t <= seconds) return h;
  return history[0];
}

function rate(key, seconds = 10) {
  if (history.length < 2) return null;
  const a = snapshotAgo(seconds), b = history[history.length - 1];
  return b.t > a.t ? (b.data.counters[key] - a.data.counters[key]) / (b.t - a.t) : null;
}

// Quantile of the observations between two cumulative histograms, linear within a bucket.
function quantile(q, name) {
  const b = history[history.length - 1].data.histograms[name];
  const a = snapshotAgo(LATENCY_WINDOW_S).data.histograms[name];
  let delta = b.map(([le, n], i) => [le, n - (history.length > 1 ? a[i][1] : 0)]);
  if (delta[delta.length - 1][1] <= 0) delta = b;  // nothing new in the window: all time
  const total = delta[delta.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0, prevN = 0;
  for (const [le, n] of delta) {
    if (n >= rank) {
      if (le == null) return prevLe;  // in the +Inf bucket: its lower bound
      return prevLe + (le - prevLe) * (n > prevN ? (rank - prevN) / (n - prevN) : 0);
    }
    prevLe = le; prevN = n;
  }
  return prevLe;
}

function drawThroughput() {
  const c = document.getElementById("throughput"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const pts = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    pts.push([b.t, (b.data.counters.generation_tokens - a.data.counters.generation_tokens) / (b.t - a.t)]);
  }
  if (!pts.length) return;
  const t1 = pts[pts.length - 1][0], t0 = t1 - WINDOW_S, ymax = Math.max(1, ...pts.map((p) => p[1]));
  g.strokeStyle = "#d9480f"; g.lineWidth = 2; g.beginPath();
  pts.forEach(([t, y], i) => {
    const x = ((t - t0) / WINDOW_S) * (c.width - 50) + 40, yy = c.height - 20 - (y / ymax) * (c.height - 30);
    i ? g.lineTo(x, yy) : g.moveTo(x, yy);
  });
  g.stroke();
  g.fillStyle = "#555"; g.font = "11px system-ui";
  g.fillText(fmt(ymax, 0), 4, 14); g.fillText("0", 4, c.height - 20);
}

function heatColor(v) {  // 0 → pale, 1 → deep orange-red
  const r = 255, gr = Math.round(245 - 200 * v), b = Math.round(235 - 225 * v);
  return `rgb(${r},${gr},${b})`;
}

function drawHeatmap(load) {
  const c = document.getElementById("heatmap"), g = c.getContext("2d"), info = document.getElementById("heatmap-info");
  g.clearRect(0, 0, c.width, c.height);
  if (!load || !load.layers.length) { c.dataset.cells = "0"; return; }
  const L = load.layers.length, E = load.num_experts, left = 60, top = 10, bottom = 24;
  const cw = (c.width - left - 10) / E, ch = (c.height - top - bottom) / L;
  let max = 0, total = 0, cells = 0;
  for (const row of load.counts) for (const n of row) { max = Math.max(max, n); total += n; }
  g.font = "11px system-ui"; g.fillStyle = "#555";
  load.counts.forEach((row, i) => {
    row.forEach((n, e) => {
      g.fillStyle = heatColor(max ? n / max : 0);
      g.fillRect(left + e * cw, top + i * ch, Math.max(cw - 1, 1), Math.max(ch - 1, 1));
      if (n > 0) cells++;
    });
    g.fillStyle = "#555"; g.fillText("layer " + load.layers[i], 4, top + i * ch + ch / 2 + 4);
  });
  g.fillText("expert 0", left, c.height - 8);
  g.fillText("expert " + (E - 1), c.width - 70, c.height - 8);
  c.dataset.cells = String(cells);
  c.dataset.total = String(total);
  const last = load.last_step.map((s) => `L${s.layer} ${fmt(100 * s.active_ratio, 0)}%`).join(", ");
  info.textContent = `${L} layers × ${E} experts, ${total} (token, expert) pairs over ${load.num_steps} steps; ` +
    `max cell ${max}. Experts active in the last step: ${last}`;
}

function render() {
  const d = history[history.length - 1].data;
  document.getElementById("gen-rate").textContent = fmt(rate("generation_tokens"));
  document.getElementById("prompt-rate").textContent = fmt(rate("prompt_tokens"));
  document.getElementById("queue").textContent = `${d.gauges.requests_running} / ${d.gauges.requests_waiting}`;
  document.getElementById("slots").textContent = `${d.gauges.slots_used} / ${d.gauges.slots_total}`;
  const lat = (name) => `${fmtSeconds(quantile(0.5, name))} / ${fmtSeconds(quantile(0.99, name))}`;
  document.getElementById("ttft").textContent = lat("time_to_first_token_seconds");
  document.getElementById("tpot").textContent = lat("time_per_output_token_seconds");
  document.getElementById("params").textContent = fmt(100 * d.gauges.active_params_ratio, 1) + " %";
  // Share of looked-up prompt tokens found cached over the last minute (all time if none came).
  let queried = rate("prefix_cache_queried_tokens", 60), hits = rate("prefix_cache_hit_tokens", 60);
  if (!queried) { queried = d.counters.prefix_cache_queried_tokens; hits = d.counters.prefix_cache_hit_tokens; }
  document.getElementById("prefix-cache").textContent = (queried ? fmt(100 * hits / queried, 0) + " %" : "–") +
    ` / ${d.gauges.prefix_cache_states} of ${d.gauges.prefix_cache_state_entries}`;
  drawThroughput();
  drawHeatmap(d.expert_load);
}

async function poll() {
  try {
    const r = await fetch("/dashboard/data", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    history.push({ t: performance.now() / 1000, data: await r.json() });
    while (history.length > 2 && history[history.length - 1].t - history[0].t > WINDOW_S) history.shift();
    render();
    document.getElementById("status").textContent = "live, " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the server: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}
poll();
