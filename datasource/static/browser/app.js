/* mlsli SLI browser: dropdowns -> GET /api/v1/series -> a small hand-written SVG line chart.
 *
 * No framework and no build step. Every number on the page comes from the flat endpoints,
 * so it is what Grafana shows for the same request. What was requested and plotted is kept in
 * window.sliBrowser, which the browser test (tests/test_browser.py) reads back.
 */
"use strict";

(function () {
  const MAX_POINTS = 300; // about one point per 3 px of chart
  const RANGE_MS = { "6h": 6 * 3600e3, "1d": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
  const HEADLINE = {
    binary_classification: ["accuracy", "f1", "label_coverage", "prediction_count"],
    regression: ["mae", "rmse", "label_coverage", "prediction_count"],
  };
  const DEFAULT_METRIC = { binary_classification: "accuracy", regression: "mae" };
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const exposed = (window.sliBrowser = {
    state: "loading", renders: 0, error: null,
    query: null, url: null, series: [], headline: {}, confusion: null,
  });

  let generation = 0; // answers to an older selection are dropped
  let model = null; // GET /api/v1/models/<name>: task, threshold, latest_prediction_ts
  let drawn = { series: [], range: null }; // redrawn at the new width when the window resizes
  const labels = {}; // metric name -> label

  // ------------------------------------------------------------------ fetching

  async function getJSON(path, params) {
    const url = params ? `${path}?${params}` : path;
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.message) || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  const variable = (name, params) => getJSON(`api/v1/variables/${name}`, params);

  function fillSelect(select, items, wanted, fallback) {
    select.replaceChildren(...items.map((item) => new Option(item.__text, item.__value)));
    const values = items.map((item) => item.__value);
    select.value = [wanted, fallback].find((v) => values.includes(v)) ?? values[0] ?? "";
  }

  // ------------------------------------------------------------------ the selection

  /** The range ends at the model's latest prediction (rounded up to the minute), so replayed
   * 2020 data shows; it ends now when the model has none. */
  function rangeMs() {
    const latest = model && model.latest_prediction_ts ? Date.parse(model.latest_prediction_ts) : Date.now();
    const to = Math.ceil(latest / 60000) * 60000;
    return { from: to - RANGE_MS[$("range").value], to };
  }

  function common() {
    const params = new URLSearchParams({ model: $("model").value });
    const threshold = $("threshold").value.trim();
    if (isClassifier() && threshold !== "") params.set("threshold", threshold);
    return params;
  }

  function seriesParams(range) {
    const params = common();
    params.set("metric", $("metric").value);
    params.set("window", $("window").value);
    params.set("mode", $("mode").value);
    if ($("group_by").value !== "none") params.set("group_by", $("group_by").value);
    params.set("from", String(range.from));
    params.set("to", String(range.to));
    params.set("max_points", String(MAX_POINTS));
    return params;
  }

  /** A headline SLI: the one point at the end of the range (step 1m, from = to), over the chosen
   * window, sliding: "accuracy over the last 1h" whatever the chart's mode. */
  function headlineParams(metric, range) {
    const params = common();
    params.set("metric", metric);
    params.set("window", $("window").value);
    params.set("mode", "sliding");
    params.set("from", String(range.to));
    params.set("to", String(range.to));
    params.set("step", "60000");
    return params;
  }

  const isClassifier = () => model && model.task === "binary_classification";

  function saveInHash() {
    const state = new URLSearchParams();
    for (const id of ["model", "metric", "window", "mode", "threshold", "group_by", "range"]) {
      if ($(id).value) state.set(id, $(id).value);
    }
    history.replaceState(null, "", `#${state}`);
  }

  // ------------------------------------------------------------------ loading

  async function init() {
    const saved = new URLSearchParams(location.hash.slice(1));
    try {
      const [models, windowItems, modeItems] = await Promise.all(
        [variable("models"), variable("windows"), variable("modes")]);
      if (!models.length) throw new Error("no model yet: POST /api/v1/models, then predictions");
      fillSelect($("model"), models, saved.get("model"));
      fillSelect($("window"), windowItems, saved.get("window"), "1d");
      fillSelect($("mode"), modeItems, saved.get("mode"), "sliding");
      if (saved.get("range") in RANGE_MS) $("range").value = saved.get("range");
      $("threshold").value = saved.get("threshold") || "";
      await loadModel(saved.get("metric"), saved.get("group_by"));
    } catch (e) {
      showError(e);
      return;
    }
    $("model").addEventListener("change", () => loadModel($("metric").value, $("group_by").value)
      .catch(showError));
    for (const id of ["metric", "window", "mode", "threshold", "group_by", "range"]) {
      $(id).addEventListener("change", refresh);
    }
    $("refresh").addEventListener("click", () => loadModel($("metric").value, $("group_by").value)
      .catch(showError));
  }

  /** A model's task, latest data, metrics and segment keys; then the page. */
  async function loadModel(wantedMetric, wantedGroup) {
    const name = $("model").value;
    const params = new URLSearchParams({ model: name });
    const [info, metrics, groups] = await Promise.all([
      getJSON(`api/v1/models/${encodeURIComponent(name)}`),
      variable("metrics", params), variable("group_by", params)]);
    model = info;
    for (const item of metrics) labels[item.__value] = item.__text;
    fillSelect($("metric"), metrics, wantedMetric, DEFAULT_METRIC[info.task]);
    fillSelect($("group_by"), groups, wantedGroup, "none");
    $("threshold-field").hidden = !isClassifier();
    $("threshold").placeholder = isClassifier() ? `model default (${info.threshold})` : "";
    await refresh();
  }

  async function refresh() {
    const mine = ++generation;
    document.body.dataset.state = exposed.state = "loading";
    saveInHash();
    const range = rangeMs();
    const params = seriesParams(range);
    const url = `api/v1/series?${params}`;
    try {
      const headlines = HEADLINE[model.task] || [];
      const [rows, tiles, confusion] = await Promise.all([
        getJSON("api/v1/series", params),
        Promise.all(headlines.map((metric) => headline(metric, range))),
        isClassifier() ? getJSON("api/v1/series", confusionParams(range)) : Promise.resolve(null),
      ]);
      if (mine !== generation) return;
      const series = toSeries(rows);
      Object.assign(exposed, {
        query: Object.fromEntries(params), url, series, confusion,
        headline: Object.fromEntries(tiles.map((t) => [t.metric, t])), error: null,
      });
      hideError();
      renderTitle(range);
      drawn = { series, range };
      renderChart($("chart"), series, range);
      renderLegend(series);
      renderTiles(tiles, range);
      renderConfusion(confusion, range);
      $("json-link").href = url;
      $("csv-link").href = `${url}&format=csv`;
      exposed.state = "ready";
    } catch (e) {
      if (mine !== generation) return;
      // nothing stale stays on screen next to the error
      Object.assign(exposed, { query: Object.fromEntries(params), url, series: [], headline: {},
                               confusion: null });
      drawn = { series: [], range };
      renderChart($("chart"), [], range);
      renderLegend([]);
      renderTiles([], range);
      renderConfusion(null, range);
      showError(e);
    }
    exposed.renders += 1;
    document.body.dataset.state = exposed.state;
    document.body.dataset.renders = String(exposed.renders);
  }

  /** One tile's value; a metric the model cannot answer shows a dash (its message on hover). */
  async function headline(metric, range) {
    try {
      const rows = await getJSON("api/v1/series", headlineParams(metric, range));
      return rows.length ? { metric, value: rows[0].value, time: rows[0].time }
        : { metric, value: null, time: null };
    } catch (e) {
      return { metric, value: null, time: null, error: e.message };
    }
  }

  function confusionParams(range) {
    const params = common();
    params.set("metric", "confusion_matrix");
    params.set("from", String(range.from));
    params.set("to", String(range.to));
    return params;
  }

  /** Flat rows into one series per legend name, points [epoch ms, value or null] by time. */
  function toSeries(rows) {
    const byName = new Map();
    for (const row of rows) {
      if (!byName.has(row.series)) byName.set(row.series, []);
      byName.get(row.series).push([row.time, row.value]);
    }
    return [...byName.keys()].sort().map((name) => ({ name, points: byName.get(name) }));
  }

  function showError(e) {
    exposed.state = "error";
    exposed.error = e.message || String(e);
    document.body.dataset.state = "error";
    $("error").textContent = exposed.error;
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
  }

  // ------------------------------------------------------------------ formatting

  function formatValue(value, metric) {
    if (value === null || value === undefined) return "—";
    if (metric === "label_coverage") return `${(100 * value).toFixed(1)} %`;
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
    return String(Number(value.toPrecision(4)));
  }

  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const pad = (n) => String(n).padStart(2, "0");

  function formatDay(ms) {
    const d = new Date(ms);
    return `${MONTHS[d.getUTCMonth()]} ${d.getUTCDate()}`;
  }

  function formatTime(ms, withDay = true) {
    const d = new Date(ms);
    const hm = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
    return withDay ? `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${hm}` : hm;
  }

  const windowText = () => ($("window").value === "cumulative" ? "cumulative" : `over ${$("window").value}`);

  // ------------------------------------------------------------------ rendering

  function renderTitle(range) {
    const metric = $("metric").value;
    const mode = $("window").value === "cumulative" ? "" : `, ${$("mode").value}`;
    $("chart-title").textContent = `${labels[metric] || metric} (${$("window").value}${mode})`
      + ` · ${formatTime(range.from)} – ${formatTime(range.to)} UTC`;
  }

  function renderTiles(tiles, range) {
    $("headline-caption").textContent = `At ${formatTime(range.to)} UTC, ${windowText()}`;
    $("tiles").replaceChildren(...tiles.map((t) => {
      const tile = document.createElement("div");
      tile.className = "tile";
      tile.dataset.metric = t.metric;
      const value = document.createElement("strong");
      value.textContent = formatValue(t.value, t.metric);
      if (t.error) value.title = t.error;
      const name = document.createElement("span");
      name.textContent = labels[t.metric] || t.metric;
      tile.append(value, name);
      return tile;
    }));
  }

  function renderConfusion(rows, range) {
    $("confusion-section").hidden = rows === null;
    if (rows === null) return;
    $("confusion-caption").textContent = `labeled predictions, ${formatTime(range.from)} – ${formatTime(range.to)} UTC`;
    const columns = ["actual", "predicted 0", "predicted 1", "total"];
    const head = document.createElement("tr");
    head.append(...columns.map((c) => Object.assign(document.createElement("th"), { textContent: c })));
    const body = rows.map((row) => {
      const tr = document.createElement("tr");
      tr.append(...columns.map((c, i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        cell.textContent = i === 0 ? row[c] : formatValue(row[c]);
        return cell;
      }));
      return tr;
    });
    $("confusion").replaceChildren(head, ...body);
  }

  function renderLegend(series) {
    $("legend").replaceChildren(...series.map((s, i) => {
      const item = document.createElement("li");
      const swatch = document.createElement("i");
      swatch.style.background = COLORS[i % COLORS.length];
      const last = [...s.points].reverse().find((p) => p[1] !== null);
      item.append(swatch, `${s.name}`);
      const value = document.createElement("span");
      value.textContent = last ? formatValue(last[1], $("metric").value) : "no data";
      item.append(value);
      return item;
    }));
  }

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  /** About ``count`` round ticks (1, 2 or 5 times a power of ten) covering [lo, hi]. */
  function valueTicks(lo, hi, count) {
    const raw = (hi - lo) / count;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    const ticks = [];
    for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Number(v.toPrecision(12)));
    }
    if (ticks[ticks.length - 1] < hi) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
    return ticks;
  }

  /** Time ticks at whole UTC hours or days, at most about eight. */
  function timeTicks(from, to) {
    const hour = 3600e3;
    const steps = [hour, 2 * hour, 3 * hour, 6 * hour, 12 * hour, 24 * hour, 48 * hour, 168 * hour];
    const step = steps.find((s) => (to - from) / s <= 8) || Math.ceil((to - from) / 8 / (24 * hour)) * 24 * hour;
    const ticks = [];
    for (let t = Math.ceil(from / step) * step; t <= to; t += step) ticks.push(t);
    return { ticks, daily: step >= 24 * hour };
  }

  function renderChart(container, series, range) {
    const width = Math.max(container.clientWidth || 900, 320);
    const height = 340;
    const m = { top: 12, right: 20, bottom: 30, left: 64 };
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                              "aria-label": $("chart-title").textContent });
    container.replaceChildren(root);

    const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
    if (!values.length) {
      svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, root)
        .textContent = series.length ? "Every point in this range is a gap (no data or undefined)"
          : "No data in this range";
      return;
    }
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (lo === hi) {
      const spread = Math.abs(lo) * 0.1 || 1;
      lo -= spread;
      hi += spread;
    }
    const yTicks = valueTicks(lo, hi, 5);
    lo = yTicks[0];
    hi = yTicks[yTicks.length - 1];
    const x = (t) => m.left + ((t - range.from) / (range.to - range.from)) * (width - m.left - m.right);
    const y = (v) => height - m.bottom - ((v - lo) / (hi - lo)) * (height - m.top - m.bottom);

    const axes = svg("g", { class: "axes" }, root);
    for (const v of yTicks) {
      svg("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: "grid" }, axes);
      svg("text", { x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, axes).textContent = formatValue(v);
    }
    const { ticks, daily } = timeTicks(range.from, range.to);
    for (const t of ticks) {
      svg("line", { x1: x(t), x2: x(t), y1: m.top, y2: height - m.bottom, class: "grid" }, axes);
      const midnight = t % (24 * 3600e3) === 0;
      svg("text", { x: x(t), y: height - m.bottom + 18, "text-anchor": "middle" }, axes)
        .textContent = daily || midnight ? formatDay(t) : formatTime(t, false);
    }
    svg("line", { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom,
                  class: "axis" }, axes);

    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      let d = "";
      let pen = false;
      const lonely = [];
      s.points.forEach(([t, v], k) => {
        if (v === null) {
          pen = false;
          return;
        }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        const prev = s.points[k - 1];
        const next = s.points[k + 1];
        if ((!prev || prev[1] === null) && (!next || next[1] === null)) lonely.push([t, v]);
        pen = true;
      });
      svg("path", { d, stroke: color, class: "line", "data-series": s.name }, root);
      for (const [t, v] of lonely) svg("circle", { cx: x(t), cy: y(v), r: 2.5, fill: color }, root);
    });
    addHover(root, series, x, m, height);
  }

  /** A vertical rule and the values at the nearest point in time, under the pointer. */
  function addHover(root, series, x, m, height) {
    const times = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const rule = svg("line", { y1: m.top, y2: height - m.bottom, class: "rule", visibility: "hidden" }, root);
    const tip = $("tooltip") || Object.assign(document.createElement("div"), { id: "tooltip" });
    tip.hidden = true;
    root.parentNode.appendChild(tip);
    root.addEventListener("mousemove", (event) => {
      const px = event.clientX - root.getBoundingClientRect().left;
      const t = times.reduce((best, c) => (Math.abs(x(c) - px) < Math.abs(x(best) - px) ? c : best), times[0]);
      rule.setAttribute("x1", x(t));
      rule.setAttribute("x2", x(t));
      rule.setAttribute("visibility", "visible");
      const lines = series.map((s, i) => {
        const point = s.points.find((p) => p[0] === t);
        return `<i style="background:${COLORS[i % COLORS.length]}"></i>${escapeHtml(s.name)}: `
          + `<b>${formatValue(point ? point[1] : null, $("metric").value)}</b>`;
      });
      tip.innerHTML = `<div>${formatTime(t)} UTC</div>${lines.join("<br>")}`;
      tip.style.left = `${Math.min(x(t) + 12, root.clientWidth - 240)}px`;
      tip.hidden = false;
    });
    root.addEventListener("mouseleave", () => {
      rule.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
  }

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => drawn.range && renderChart($("chart"), drawn.series, drawn.range), 150);
  });
  window.addEventListener("DOMContentLoaded", init);
})();
