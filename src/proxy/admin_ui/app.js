// gptbalance status page: reads /admin/status and /admin/usage with the
// admin token and draws them. Every value from the server goes in as text
// (textContent, SVG attributes), never as markup: model names come from
// callers.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const STATUS_EVERY_MS = 5000;
  const TOKEN_KEY = "gptbalance-admin-token";
  const $ = (id) => document.getElementById(id);

  let token = null;
  let keySort = { col: "health", dir: 1 };
  let lastStatus = null;
  let lastUsage = null;
  let usageBusy = false;
  let usageDue = 0;
  let usageEveryMs = STATUS_EVERY_MS;
  let lastGeneration = null;

  // ---- token: from the fragment (never sent to the server) or the form.
  function takeToken() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      try {
        sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      } catch (e) { /* storage off: keep it in memory only */ token = decodeURIComponent(m[1]); }
      history.replaceState(null, "", location.pathname + location.search);
    }
    try { token = sessionStorage.getItem(TOKEN_KEY) || token; } catch (e) { /* as above */ }
  }

  function setToken(t) {
    token = t || null;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* memory only */ }
  }

  function say(text, bad) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
    m.classList.toggle("bad", !!bad);
  }

  function showLogin(reason) {
    $("login").hidden = false;
    $("content").hidden = true;
    $("forget").hidden = true;
    $("summary").textContent = "Not signed in";
    say(reason, true);
    $("token").focus();
  }

  // ---- the admin API
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "gptbalance cannot be reached (" + e.message + ")");
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) {
      const msg = body && body.error && body.error.message ? body.error.message : "HTTP " + resp.status;
      throw new ApiError(resp.status, msg);
    }
    return body || {};
  }

  function failed(e) {
    if (e.status === 401) {
      setToken(null);
      showLogin("The admin token was refused: enter the value of server.admin_token.");
      return true;
    }
    if (e.status === 404) {
      showLogin("The admin API is off (" + e.message + ").");
      return true;
    }
    say(e.message + (lastStatus ? " — showing the last data received." : ""), true);
    return false;
  }

  // ---- small DOM helpers
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }
  function td(content, cls) {
    const t = el("td", null, cls);
    if (content instanceof Node) t.appendChild(content); else t.textContent = content == null ? "" : String(content);
    return t;
  }
  function fact(dl, name, value) {
    const d = el("div");
    d.appendChild(el("dt", name));
    d.appendChild(el("dd", value));
    dl.appendChild(d);
  }
  const n = (v) => (typeof v === "number" ? v.toLocaleString("en-US") : "–");
  const usd = (v) => (typeof v === "number" ? "$" + v.toFixed(v >= 100 ? 0 : 2) : "–");
  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().replace("T", " ").slice(0, 19);
  }

  // ---- status: config, keys, callers
  function health(k) {
    if (k.healthy) return { rank: 2, label: "healthy", cls: "ok" };
    if (k.awaiting_probe) return { rank: 0, label: "refused, probing", cls: "probing" };
    return { rank: 1, label: "cooling", cls: "cooling" };
  }

  function quota(k) {
    const q = k.quota || k.last_quota;
    if (!q || typeof q !== "object") return "–";
    return Object.keys(q).map((name) => name + " " + q[name]).join(", ");
  }

  function renderStatus(s) {
    $("login").hidden = true;
    $("content").hidden = false;
    $("forget").hidden = false;
    const lr = s.last_reload || {};
    let keys = 0, healthy = 0;
    for (const c of s.clients || []) for (const k of c.keys || []) { keys++; if (k.healthy) healthy++; }
    $("summary").textContent = "generation " + s.generation + " · " + healthy + " of " + keys + " keys healthy";
    if (lastGeneration !== null && s.generation !== lastGeneration) {
      say("The config was reloaded (generation " + lastGeneration + " → " + s.generation + "); clients and keys below are the new ones.", false);
    }
    lastGeneration = s.generation;

    const dl = $("reload");
    dl.replaceChildren();
    fact(dl, "Generation", s.generation);
    fact(dl, "Last reload", lr.ok === false ? "failed" : "ok");
    fact(dl, "At (UTC)", when(lr.at));
    const errs = $("reload-errors");
    errs.replaceChildren();
    for (const e of lr.errors || []) errs.appendChild(el("li", e));

    const rows = [];
    for (const c of s.clients || []) {
      for (const k of c.keys || []) rows.push({ client: c.name, k: k, h: health(k) });
    }
    const key = {
      client: (r) => r.client, id: (r) => r.k.id, health: (r) => r.h.rank,
      cooldown: (r) => r.k.cooldown_until || "", requests: (r) => r.k.requests || 0,
      failures: (r) => r.k.failures || 0, probe: (r) => r.k.probes || 0,
    }[keySort.col];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * keySort.dir || a.client.localeCompare(b.client);
    });
    const body = $("keys").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const probe = r.k.probes ? r.k.probes + " (last " + (r.k.last_probe || "?") + ")" : (r.k.awaiting_probe ? "due" : "–");
      body.appendChild(row([
        td(r.client), td(r.k.id, "mono"), td(el("span", r.h.label, "pill " + r.h.cls)),
        td(r.k.cooldown_until ? when(r.k.cooldown_until) : "–"),
        td(n(r.k.requests), "num"), td(n(r.k.failures), "num"), td(probe), td(quota(r.k), "wrap"),
      ]));
    }
    for (const b of document.querySelectorAll("#keys th button")) {
      b.classList.toggle("asc", b.dataset.sort === keySort.col && keySort.dir > 0);
      b.classList.toggle("desc", b.dataset.sort === keySort.col && keySort.dir < 0);
    }

    const callers = Array.isArray(s.callers) ? s.callers : null;
    $("callers-section").hidden = !callers;
    if (callers) {
      const cb = $("callers").tBodies[0];
      cb.replaceChildren();
      for (const c of callers) cb.appendChild(row([
        td(c.name), td(used(c.in_flight, (c.limits || {}).concurrency), "num"),
        td(used(c.rpm_used, (c.limits || {}).rpm), "num"), td(used(c.tpm_used, (c.limits || {}).tpm), "num"),
        td(spend(c)), td(usd(c.reserved_usd), "num"), td(c.period || "–"),
      ]));
      if (!callers.length) cb.appendChild(row([td("No callers are configured.")]));
    }
  }

  // Spend, against the budget when the caller has one (`limits.budget_usd`
  // or `limits.budget_tokens`).
  function spend(c) {
    const wrap = el("span");
    const limits = c.limits || {};
    const usdBudget = typeof limits.budget_usd === "number" ? limits.budget_usd : null;
    const tokenBudget = typeof limits.budget_tokens === "number" ? limits.budget_tokens : null;
    const frac = usdBudget > 0 ? (c.spent_usd || 0) / usdBudget
      : tokenBudget > 0 ? (c.spent_tokens || 0) / tokenBudget : null;
    if (frac !== null) {
      const f = Math.min(1, Math.max(0, frac));
      const bar = svg("svg", { width: 80, height: 8, viewBox: "0 0 80 8", class: "budget-bar" });
      bar.appendChild(svg("rect", { width: 80, height: 8, rx: 4, fill: "#dde1e8" }));
      bar.appendChild(svg("rect", { width: Math.round(80 * f), height: 8, rx: 4, fill: f >= 0.9 ? "#c62828" : "#1a7f37" }));
      wrap.appendChild(bar);
    }
    const text = usdBudget > 0 ? usd(c.spent_usd) + " of " + usd(usdBudget)
      : tokenBudget > 0 ? n(c.spent_tokens) + " of " + n(tokenBudget) + " tokens"
      : usd(c.spent_usd) + (typeof c.spent_tokens === "number" ? " · " + n(c.spent_tokens) + " tokens" : "");
    wrap.appendChild(document.createTextNode((frac !== null ? " " : "") + text));
    return wrap;
  }

  // "used / limit" when the caller has that limit.
  function used(v, limit) {
    return n(v) + (typeof limit === "number" ? " / " + n(limit) : "");
  }

  // ---- usage: totals, per-day chart, groups, latest errors
  function daysIn(month) {
    const [y, m] = month.split("-").map(Number);
    return new Date(Date.UTC(y, m, 0)).getUTCDate();
  }

  function renderUsage(u) {
    const note = $("usage-note");
    const text = u.unavailable ? "Usage cannot be read: " + u.unavailable : u.note || "";
    note.textContent = text;
    note.hidden = !text;
    note.classList.toggle("bad", !!u.unavailable);

    const metric = $("metric").value;
    const t = u.total || {};
    const cost = typeof t.cost_usd === "number" ? t.cost_usd : (u.days || []).reduce((s, d) => s + (d.cost_usd || 0), 0);
    const dl = $("usage-totals");
    dl.replaceChildren();
    fact(dl, "Requests", n(t.requests));
    fact(dl, "Errors", n(t.errors));
    fact(dl, "Tokens", n(t.total_tokens));
    fact(dl, "Cost", usd(cost));
    fact(dl, "p95 latency", typeof t.latency_p95_ms === "number" ? t.latency_p95_ms + " ms" : "–");

    drawChart(u, metric);

    $("group-head").textContent = u.by === "key_id" ? "Key" : (u.by || "group").replace(/^./, (c) => c.toUpperCase());
    const gb = $("groups").tBodies[0];
    gb.replaceChildren();
    for (const g of u.groups || []) gb.appendChild(row([
      td(g.group, "wrap"), td(n(g.requests), "num"), td(n(g.errors), "num"), td(n(g.total_tokens), "num"),
      td(usd(g.cost_usd), "num"), td(n(g.latency_p50_ms), "num"), td(n(g.latency_p95_ms), "num"),
    ]));

    const eb = $("latest-errors").tBodies[0];
    eb.replaceChildren();
    for (const e of u.latest_errors || []) eb.appendChild(row([
      td(when(e.ts)), td(e.status, "num"), td(e.client || "–"), td(e.model || "–"), td(e.error || "", "wrap"),
    ]));
    $("errors-empty").hidden = (u.latest_errors || []).length > 0;
    $("latest-errors").hidden = (u.latest_errors || []).length === 0;
  }

  function drawChart(u, metric) {
    const month = u.month || $("month").value;
    const days = daysIn(month);
    const series = new Map(); // group -> total of the metric
    for (const d of u.days_by || []) series.set(d.group, (series.get(d.group) || 0) + (d[metric] || 0));
    // The six largest groups get a colour each; the rest add up as "other".
    const top = [...series.entries()].filter((e) => e[1] > 0).sort((a, b) => b[1] - a[1]);
    const named = top.slice(0, top.length > 7 ? 6 : 7).map((e) => e[0]);
    const slot = (g) => { const i = named.indexOf(g); return i >= 0 ? i : 6; };
    const stacks = Array.from({ length: days }, () => new Array(7).fill(0));
    for (const d of u.days_by || []) {
      const day = Number(String(d.date).slice(8, 10));
      if (day >= 1 && day <= days) stacks[day - 1][slot(d.group)] += d[metric] || 0;
    }
    const max = Math.max(0, ...stacks.map((s) => s.reduce((a, b) => a + b, 0)));

    // Drawn at the box's own width, so labels keep their size on a phone.
    const W = Math.max(320, Math.min(1100, $("chart").clientWidth || 720));
    const H = W < 500 ? 180 : 240, L = 44, B = 22, T = 8, R = 6;
    const plotW = W - L - R, plotH = H - T - B, step = plotW / days, barW = Math.max(2, step * 0.7);
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": metric + " per day, " + month, "data-days": (u.days || []).length });
    const scale = max > 0 ? niceMax(max) : 1;
    for (let i = 0; i <= 4; i++) {
      const y = T + plotH - (plotH * i) / 4;
      chart.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis" }));
      const label = svg("text", { x: L - 4, y: y + 3, "text-anchor": "end", class: "tick" });
      label.textContent = metric === "cost_usd" ? "$" + fmtShort((scale * i) / 4) : fmtShort((scale * i) / 4);
      chart.appendChild(label);
    }
    for (let d = 0; d < days; d++) {
      let y = T + plotH;
      for (let s = 0; s < 7; s++) {
        const v = stacks[d][s];
        if (!v) continue;
        const h = (plotH * v) / scale;
        y -= h;
        const rect = svg("rect", { x: (L + d * step + (step - barW) / 2).toFixed(1), y: y.toFixed(1), width: barW.toFixed(1), height: Math.max(0.5, h).toFixed(1), class: "bar s" + s });
        const tip = svg("title", {});
        tip.textContent = month + "-" + String(d + 1).padStart(2, "0") + " " + (s < named.length ? named[s] : "other") + ": " + (metric === "cost_usd" ? usd(v) : n(v));
        rect.appendChild(tip);
        chart.appendChild(rect);
      }
      if (d === 0 || (d + 1) % 5 === 0) {
        const label = svg("text", { x: (L + d * step + step / 2).toFixed(1), y: H - 6, "text-anchor": "middle", class: "tick" });
        label.textContent = String(d + 1);
        chart.appendChild(label);
      }
    }
    $("chart").replaceChildren(chart);
    const names = { requests: "Requests", errors: "Errors", total_tokens: "Tokens", cost_usd: "Cost" };
    $("chart-caption").textContent = max > 0
      ? names[metric] + " per day in " + month + " (UTC), by " + (u.by === "key_id" ? "key" : u.by) + "."
      : "No " + names[metric].toLowerCase() + " recorded in " + month + " yet: the chart fills in as requests are served.";
    const legend = $("legend");
    legend.replaceChildren();
    if (max > 0) {
      named.forEach((g, i) => legend.appendChild(el("li", g, "s" + i)));
      if (top.length > named.length) legend.appendChild(el("li", "other", "s6"));
    }
  }

  function niceMax(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function fmtShort(v) {
    if (v >= 1e9) return +(v / 1e9).toFixed(1) + "G";
    if (v >= 1e6) return +(v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return +(v / 1e3).toFixed(1) + "k";
    return String(+v.toFixed(2));
  }

  // ---- refresh loop
  async function refreshStatus() {
    if (!token) {
      if ($("login").hidden) showLogin("Enter the admin token to see the status.");
      return true;
    }
    try {
      lastStatus = await api("/admin/status");
      if ($("message").classList.contains("bad")) say("");
      renderStatus(lastStatus);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      return failed(e);
    }
    return false;
  }

  // The usage report reads the month's file: it is refreshed every 5 s
  // while that is cheap, and less often when it takes long.
  async function refreshUsage(force) {
    if (!token || usageBusy || (!force && Date.now() < usageDue)) return;
    usageBusy = true;
    const started = Date.now();
    try {
      const q = "?month=" + encodeURIComponent($("month").value) + "&by=" + encodeURIComponent($("by").value);
      lastUsage = await api("/admin/usage" + q);
      renderUsage(lastUsage);
    } catch (e) {
      failed(e);
    } finally {
      usageBusy = false;
      usageEveryMs = Math.max(STATUS_EVERY_MS, 10 * (Date.now() - started));
      usageDue = Date.now() + usageEveryMs;
    }
  }

  async function tick() {
    if ((await refreshStatus()) !== true) await refreshUsage(false);
  }

  function start() {
    takeToken();
    const now = new Date();
    $("month").value = now.getUTCFullYear() + "-" + String(now.getUTCMonth() + 1).padStart(2, "0");
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      setToken($("token").value.trim());
      $("token").value = "";
      say("");
      tick();
    });
    $("forget").addEventListener("click", () => { setToken(null); showLogin("Token forgotten."); });
    for (const b of document.querySelectorAll("#keys th button")) {
      b.addEventListener("click", () => {
        keySort = { col: b.dataset.sort, dir: keySort.col === b.dataset.sort ? -keySort.dir : 1 };
        if (lastStatus) renderStatus(lastStatus);
      });
    }
    $("month").addEventListener("change", () => { if (/^\d{4}-\d{2}$/.test($("month").value)) refreshUsage(true); });
    $("by").addEventListener("change", () => refreshUsage(true));
    $("metric").addEventListener("change", () => { if (lastUsage) renderUsage(lastUsage); });
    tick();
    setInterval(tick, STATUS_EVERY_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
