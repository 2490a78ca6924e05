// The Sluice fleet dashboard: polls /sluice/v1/fleet and redraws in place (no reload,
// no libraries). Charts cover the last 15 minutes: the server's history (one point per
// 5 s, kept in Redis) followed by this page's own polls.
"use strict";

const POLL_MS = 2000;
const SPAN_S = 15 * 60;
let polls = 0;
let livePoints = [];

const $ = (sel) => document.querySelector(sel);
const fmt = (v, digits = 1) =>
  v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });
const ms = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? fmt(v / 1000, 2) + " s" : fmt(v, 0) + " ms");
const pct = (v) => (v === null || v === undefined ? "–" : fmt(v * 100, 1) + "%");

function pointOf(view) {
  const pools = {};
  for (const p of view.pools) pools[p.name] = [p.requests_per_min, p.tokens_per_min, p.in_flight, p.throttle_rate];
  const classes = {};
  for (const c of view.classes) classes[c.name] = [c.admitted_per_s, c.refused_per_s, c.p99_ms];
  return { t: view.generated_at, pools, classes };
}

function series(history, kind, name, index) {
  const first = livePoints.length ? livePoints[0].t : Infinity;
  const horizon = Date.now() / 1000 - SPAN_S;
  const points = history.filter((p) => p.t < first).concat(livePoints);
  return points
    .filter((p) => p.t >= horizon && p[kind] && p[kind][name])
    .map((p) => [p.t, p[kind][name][index]]);
}

function spark(values) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 160 28");
  svg.setAttribute("preserveAspectRatio", "none");
  const data = values.filter((v) => v[1] !== null && v[1] !== undefined);
  if (data.length > 1) {
    const t0 = data[0][0], t1 = data[data.length - 1][0];
    const top = Math.max(...data.map((v) => v[1]), 1e-9);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", data.map(([t, v]) =>
      `${((t - t0) / Math.max(t1 - t0, 1e-9) * 158 + 1).toFixed(1)},${(27 - v / top * 25).toFixed(1)}`).join(" "));
    svg.appendChild(line);
  }
  svg.dataset.points = String(data.length);
  return svg;
}

function row(tbody, key, name, cells) {
  let tr = tbody.querySelector(`tr[data-name="${CSS.escape(name)}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.name = name;
    tbody.appendChild(tr);
  }
  tr.replaceChildren(...cells.map(([field, value, cls]) => {
    const td = document.createElement("td");
    td.dataset.field = field;
    if (cls) td.className = cls;
    if (value instanceof Node) td.appendChild(value); else td.textContent = value;
    return td;
  }));
  tr.dataset.seen = key;
}

function prune(tbody, key) {
  for (const tr of [...tbody.querySelectorAll("tr")]) if (tr.dataset.seen !== key) tr.remove();
}

function list(el, items, empty) {
  el.replaceChildren(...(items.length ? items : [empty]).map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    if (!items.length) li.className = "none";
    return li;
  }));
}

// What an instance runs: a stored version, or a file with its own reload count.
function runs(i) {
  const sha = (i.policy_sha || "").slice(0, 12) || "–";
  return i.policy_source === "redis"
    ? `v${i.policy_version} (sha ${sha})`
    : `file ${i.policy_source} (local v${i.policy_version}, sha ${sha})`;
}

function offPolicy(view) {
  const version = view.policy.version ?? "–";
  const items = view.instances.filter((i) => i.own_file || !i.on_policy).map((i) => {
    const li = document.createElement("li");
    li.dataset.instance = i.id;
    li.textContent = i.own_file
      ? `${i.id} runs its own ${runs(i)}: --no-fleet, not a member`
      : `${i.id} is not on v${version}: runs ${runs(i)}`;
    return li;
  });
  $("#off-policy").replaceChildren(...items);
}

function render(view) {
  const key = String(view.generated_at);
  const history = view.history || [];
  $("#fleet-name").textContent = view.fleet;
  $("#policy-version").textContent = "v" + (view.policy.version ?? "–");
  $("#policy-sha").textContent = (view.policy.sha || "").slice(0, 12) || "–";
  $("#policy-author").textContent = view.policy.author || "–";
  // Members only; every instance not on the fleet's version is named below the facts.
  $("#instances").textContent = String(view.members ?? view.instances.length);
  offPolicy(view);
  $("#updated-at").textContent = new Date(view.generated_at * 1000).toLocaleTimeString();

  const pools = $("#pools tbody");
  for (const p of view.pools) {
    const q = p.quota || {};
    const atLimit = p.limit && p.in_flight >= 0.95 * p.limit;
    row(pools, key, p.name, [
      ["name", p.name], ["limit", fmt(p.limit, 0)], ["adaptive_limit", fmt(p.adaptive_limit, 0)],
      ["in_flight", fmt(p.in_flight, 0), atLimit ? "hot" : ""],
      ["requests_per_min", fmt(p.requests_per_min)], ["rpm_quota", fmt(q.rpm, 0)],
      ["tokens_per_min", fmt(p.tokens_per_min, 0)], ["tpm_quota", fmt(q.tpm, 0)],
      ["throttle_rate", pct(p.throttle_rate), p.throttle_rate > 0.05 ? "hot" : ""],
      ["breaker", p.breaker || "–", p.breaker || ""],
      ["rpm_chart", spark(series(history, "pools", p.name, 0))],
      ["in_flight_chart", spark(series(history, "pools", p.name, 2))],
    ]);
  }
  prune(pools, key);

  const classes = $("#classes tbody");
  for (const c of view.classes) {
    row(classes, key, c.name, [
      ["name", c.name], ["share", pct(c.share)], ["admitted_per_s", fmt(c.admitted_per_s, 2)],
      ["refused_per_s", fmt(c.refused_per_s, 2)], ["degraded_per_s", fmt(c.degraded_per_s, 2)],
      ["p50_ms", ms(c.p50_ms)],
      ["p99_ms", ms(c.p99_ms), c.target_p99_ms && c.p99_ms > c.target_p99_ms ? "hot" : ""],
      ["target_p99_ms", ms(c.target_p99_ms)],
      ["admitted_chart", spark(series(history, "classes", c.name, 0))],
      ["p99_chart", spark(series(history, "classes", c.name, 2))],
    ]);
  }
  prune(classes, key);

  const workloads = $("#workloads tbody");
  for (const w of view.workloads) {
    row(workloads, key, w.name, [
      ["name", w.name], ["priority", w.priority || "–"], ["admitted_per_s", fmt(w.admitted_per_s, 2)],
      ["refused_per_s", fmt(w.refused_per_s, 2)], ["degraded_per_s", fmt(w.degraded_per_s, 2)],
      ["p50_ms", ms(w.p50_ms)], ["p99_ms", ms(w.p99_ms)],
      ["state", w.paused ? "paused" : "running", w.paused ? "paused" : ""],
    ]);
  }
  prune(workloads, key);

  list($("#schedules"), Object.entries(view.schedules).map(([w, s]) =>
    `${w}: concurrency ${s.concurrency} (${s.window})`), "none");
  list($("#batch"), Object.entries(view.batch).map(([w, q]) =>
    `${w}: ${fmt(q.queued, 0)} queued, oldest ${fmt(q.oldest_s, 0)} s`), "none yet");
  list($("#dlq"), Object.entries(view.dlq).map(([k, n]) => `${k.replace("|", " · ")}: ${fmt(n, 0)}`), "none");
}

async function poll() {
  try {
    const resp = await fetch("/sluice/v1/fleet", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const view = await resp.json();
    livePoints.push(pointOf(view));
    livePoints = livePoints.filter((p) => p.t >= view.generated_at - SPAN_S);
    render(view);
    polls += 1;
    $("#polls").textContent = String(polls);
    $("#status").textContent = "";
  } catch (err) {
    $("#status").textContent = "fleet view unavailable: " + err.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
