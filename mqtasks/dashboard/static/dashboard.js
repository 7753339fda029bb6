// mqtasks dashboard: live queue table and charts, and job progress.
// Hand-written on purpose: a few fetch() polls and SVG polylines need no framework
// and no build step. Text is only ever set with textContent, never parsed as HTML.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const SPAN = 15 * 60; // seconds shown by a chart
  const LINES = ["ready", "unacked", "dead"];

  function fmt(value) {
    return value === null || value === undefined ? "-" : String(value);
  }

  function rate(value, signed) {
    if (value === null || value === undefined) return "-";
    return (signed && value >= 0 ? "+" : "") + value.toFixed(2);
  }

  // As the server formats them (mqtasks.dashboard.data.seconds).
  function seconds(value) {
    if (value === null || value === undefined) return "-";
    if (value < 60) return value.toFixed(1) + " s";
    const minutes = Math.floor(value / 60);
    const pad = function (n) { return String(n).padStart(2, "0"); };
    if (minutes < 60) return minutes + "m" + pad(Math.floor(value) % 60) + "s";
    return Math.floor(minutes / 60) + "h" + pad(minutes % 60) + "m";
  }

  function setCell(row, field, text) {
    const c = cell(row, field);
    if (c) c.textContent = text;
  }

  function cell(row, field) {
    return row.querySelector('[data-field="' + field + '"]');
  }

  function updateRow(tbody, q) {
    let row = null;
    for (const r of tbody.querySelectorAll("tr[data-queue]")) {
      if (r.dataset.queue === q.queue) row = r;
    }
    if (row === null) return;
    cell(row, "ready").textContent = fmt(q.ready);
    cell(row, "unacked").textContent = fmt(q.unacked);
    cell(row, "delayed").textContent = fmt(q.delayed) + (q.delayed_scope === "vhost" ? "*" : "");
    const dead = cell(row, "dead_lettered");
    const link = dead.querySelector("a");
    if (link && q.dead_lettered) link.textContent = fmt(q.dead_lettered);
    else dead.textContent = fmt(q.dead_lettered);
    cell(row, "consumers").textContent = fmt(q.consumers);
    setCell(row, "lag", seconds(q.lag));
    setCell(row, "ready_rate", rate(q.ready_rate, true));
    setCell(row, "error_rate", rate(q.error_rate, false));
    setCell(row, "ack_rate", rate(q.ack_rate, false));
  }

  function drawChart(figure, times, lines, now) {
    const svg = figure.querySelector("svg");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    let top = 1;
    for (const name of LINES) {
      for (const v of lines[name] || []) if (v !== null && v > top) top = v;
    }
    // The last 15 minutes, or since the first sample when the dashboard is younger.
    const span = times.length ? Math.max(60, Math.min(SPAN, now - times[0])) : SPAN;
    for (const name of LINES) {
      const values = lines[name] || [];
      let points = [];
      const flush = function () {
        if (points.length > 0) {
          const line = document.createElementNS(SVG, "polyline");
          line.setAttribute("points", points.join(" "));
          line.setAttribute("class", "line " + name);
          line.setAttribute("vector-effect", "non-scaling-stroke");
          svg.appendChild(line);
        }
        points = [];
      };
      for (let i = 0; i < times.length; i++) {
        const v = values[i];
        if (v === null || v === undefined) { flush(); continue; }
        const x = 300 * (1 - (now - times[i]) / span);
        const y = 98 - 96 * (v / top);
        points.push(x.toFixed(1) + "," + y.toFixed(1));
      }
      flush();
    }
    const shown = span >= 120 ? Math.round(span / 60) + " min" : Math.round(span) + " s";
    figure.querySelector(".scale").textContent = times.length ? "max " + top + " · last " + shown : "no samples yet";
  }

  function ensureFigure(charts, queue) {
    for (const f of charts.querySelectorAll("figure[data-queue]")) {
      if (f.dataset.queue === queue) return f;
    }
    const figure = document.createElement("figure");
    figure.className = "chart";
    figure.dataset.queue = queue;
    const caption = document.createElement("figcaption");
    caption.textContent = queue;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 300 100");
    svg.setAttribute("preserveAspectRatio", "none");
    const scale = document.createElement("div");
    scale.className = "scale";
    figure.append(caption, svg, scale);
    charts.appendChild(figure);
    return figure;
  }

  function pollQueues(table) {
    const url = table.dataset.poll;
    const interval = Math.max(500, parseInt(table.dataset.interval, 10) || 2000);
    const tbody = table.querySelector("tbody");
    const charts = document.getElementById("charts");
    const error = document.getElementById("queues-error");
    const stamp = document.getElementById("sampled-at");
    async function tick() {
      try {
        const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const doc = await response.json();
        for (const q of doc.queues) updateRow(tbody, q);
        error.hidden = !doc.error;
        error.textContent = doc.error || "";
        if (doc.sampled_at) stamp.textContent = "last sample " + doc.sampled_at.replace("T", " ").slice(0, 19) + " UTC.";
        const times = doc.history.t;
        const now = times.length ? times[times.length - 1] : Date.now() / 1000;
        for (const [queue, lines] of Object.entries(doc.history.series)) {
          drawChart(ensureFigure(charts, queue), times, lines, now);
        }
        table.dataset.updated = String(Date.now());
      } catch (e) {
        error.hidden = false;
        error.textContent = "The dashboard could not be reached: " + e.message;
      }
      setTimeout(tick, interval);
    }
    tick();
  }

  function pollJob(box) {
    const url = box.dataset.poll;
    const bar = document.getElementById("job-progress");
    const status = document.getElementById("job-status");
    async function tick() {
      let job;
      try {
        const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        job = await response.json();
      } catch (e) {
        status.textContent = "The dashboard could not be reached: " + e.message;
        setTimeout(tick, 1000);
        return;
      }
      bar.max = Math.max(1, job.total || job.done || 1);
      bar.value = job.done;
      if (job.state === "done") {
        bar.value = bar.max;
        status.textContent = "Done: " + job.result + ".";
        box.dataset.state = "done";
      } else if (job.state === "failed") {
        status.textContent = "Failed: " + job.error;
        box.dataset.state = "failed";
      } else {
        status.textContent = job.done + (job.total !== null ? " of " + job.total : "") + " done…";
        setTimeout(tick, 500);
      }
    }
    tick();
  }

  document.addEventListener("DOMContentLoaded", function () {
    const table = document.getElementById("queues");
    if (table) pollQueues(table);
    const job = document.getElementById("job");
    if (job) pollJob(job);
  });
})();
