// flux_lightning UI: vanilla JS, no framework, nothing loaded from the internet.
"use strict";

const state = {
  spec: null,            // form_spec()
  selection: {},         // group -> option shown in its select
  expChoices: {},        // group -> option the experiment (or the defaults list) picks: sent only when changed
  configDir: null,       // the experiment dir (--config-dir) of the chosen experiment
  sources: [],           // the experiments offered: {value, name, config_dir, description}
  pending: {},           // run id -> {text, status}: Stop/Resume asked, not yet seen in the run's status
  logAttempt: {},        // run id -> the attempt whose log is shown (null: the latest)
  logCache: {},          // attempt key -> its log text
  base: {},              // field key -> its value (as text) in the composed config before the user's edits
  hardware: { mode: "auto", selected: [] },
  accelerators: [],
  selectedRun: null,
  runs: [],
  tab: "new",
};

// -- token: the server sets a cookie when the page is opened with ?token=; a token in the URL (or one
// kept from it in this tab) is also sent as a header, and appended to <img>/<a> URLs.
const TOKEN_KEY = "flux_lightning_ui_token";
(function keepToken() {
  const t = new URLSearchParams(location.search).get("token");
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
})();
function token() { return sessionStorage.getItem(TOKEN_KEY); }
function withToken(url) {
  const t = token();
  return t ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(t) : url;
}

async function api(path, { method = "GET", body } = {}) {
  if (method !== "GET" && body === undefined) body = {};  // changes are JSON (the server refuses others)
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    setConn(false, "server unreachable");
    throw err;
  }
  setConn(true);
  const data = await res.json().catch(() => ({}));
  if (res.status === 401) setConn(false, "token needed: open the URL printed at start");
  return { status: res.status, ok: res.ok, data };
}

function setConn(ok, text) {
  const el = $("#conn");
  el.textContent = ok ? "connected" : text;
  el.classList.toggle("bad", !ok);
}

// -- tiny DOM helpers --------------------------------------------------------------------------
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "testid") el.dataset.testid = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const safeId = (key) => String(key).replace(/[^A-Za-z0-9_-]/g, "-");
function toast(text, bad = false) {
  const el = $("#toast");
  el.textContent = text;
  el.classList.toggle("bad", bad);
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.hidden = true), 4000);
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Math.abs(v) >= 1000 || v === Math.round(v) ? String(v) : v.toPrecision(digits);
  return String(v);
}
function bytes(n) {
  if (!n && n !== 0) return "—";
  const gib = n / 2 ** 30;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
}

// -- tabs ----------------------------------------------------------------------------------------
function showTab(name) {
  state.tab = name;
  for (const t of $$(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  for (const p of $$(".page")) p.hidden = p.id !== "page-" + name;
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "runs") refreshRuns();
  if (name === "hardware") loadHardware();
}

// -- New run -------------------------------------------------------------------------------------
function fieldText(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function fieldInput(field) {
  const id = "field-" + safeId(field.key);
  const common = { id, testid: id, "data-key": field.key, oninput: onFieldChange, onchange: onFieldChange };
  if (field.type === "bool") {
    return h("label", { class: "check" },
      h("input", { ...common, type: "checkbox", checked: field.default === true }), h("span", { class: "muted", text: "enabled" }));
  }
  if (field.choices && field.choices.length) {
    const sel = h("select", common);
    const choices = field.choices.map(fieldText);
    if ((field.nullable || field.default === null) && !choices.includes("")) choices.unshift("");
    if (!choices.includes(fieldText(field.default))) choices.push(fieldText(field.default));
    for (const c of choices) sel.append(h("option", { value: c, text: c === "" ? "null" : c }));
    sel.value = fieldText(field.default);
    return sel;
  }
  return h("input", { ...common, type: "text", value: fieldText(field.default), spellcheck: "false",
    inputmode: field.type === "int" || field.type === "float" ? "decimal" : null, placeholder: field.nullable ? "null" : null });
}

// docstrings use reST: ``code`` and :role:`target` become <code>
function docNodes(text) {
  const clean = String(text).replace(/:[a-z]+:`~?([^`]+)`/g, "``$1``");
  return clean.split(/``([^`]+)``/).map((part, i) => (i % 2 ? h("code", { text: part }) : part));
}

function renderField(field) {
  const id = "field-" + safeId(field.key);
  return h("div", { class: "field", "data-field": field.key, testid: "fieldbox-" + safeId(field.key) },
    h("label", { for: id }, h("span", { class: "key", text: field.key }), h("span", { class: "type", text: field.type || "" })),
    fieldInput(field),
    field.doc ? h("p", { class: "help" }, docNodes(field.doc)) : null,
    h("div", { class: "problem", id: "problem-" + safeId(field.key), testid: "problem-" + safeId(field.key) }));
}

// groups shown open at first (the others open with their button, or when a problem names a field)
const OPEN_GROUPS = ["adapter", "optimizer", "trainer"];

function renderGroups() {
  const root = $("#groups");
  root.textContent = "";
  for (const group of state.spec.groups) {
    if (group.name === "experiment") continue;  // the select at the top
    for (const f of group.fields || []) state.base[f.key] = fieldText(f.default);
    const options = group.options || [];
    state.selection[group.name] = state.selection[group.name] ?? group.default_option;
    const select = options.length
      ? h("select", { id: "option-" + safeId(group.name), testid: "option-" + safeId(group.name),
          onchange: (e) => { state.selection[group.name] = e.target.value; recompose(); } },
          options.map((o) => h("option", { value: o, text: o })))
      : null;
    if (select) select.value = state.selection[group.name] ?? "";
    const open = OPEN_GROUPS.includes(group.name);
    const card = h("div", { class: "card group" + (open ? "" : " collapsed"), id: "group-" + safeId(group.name) },
      h("div", { class: "group-head" },
        h("h2", { text: group.name }), select,
        h("span", { class: "changed", id: "changed-" + safeId(group.name) }),
        (group.fields || []).length
          ? h("button", { class: "ghost small toggle", testid: "toggle-" + safeId(group.name),
              onclick: () => card.classList.toggle("collapsed") }, `${group.fields.length} field${group.fields.length === 1 ? "" : "s"}`)
          : null),
      h("div", { class: "fields" }, (group.fields || []).map(renderField)));
    root.append(card);
  }
}

function fieldValue(field) {
  // undefined = unchanged; strings are read as the field's type by the server (compose_run)
  const el = document.getElementById("field-" + safeId(field.key));
  if (!el) return undefined;
  if (el.type === "checkbox") return el.checked === (state.base[field.key] === "true") ? undefined : el.checked;
  const text = el.value.trim();
  if (text === (state.base[field.key] ?? "")) return undefined;
  return text === "" && field.nullable ? "null" : text;
}

function setField(field, text) {
  const el = document.getElementById("field-" + safeId(field.key));
  if (!el) return;
  if (el.type === "checkbox") el.checked = text === "true";
  else el.value = text;
}

function collect() {
  const values = {};
  for (const group of state.spec.groups) {
    let changed = 0;
    for (const field of group.fields || []) {
      const v = fieldValue(field);
      const box = document.querySelector(`[data-field="${CSS.escape(field.key)}"]`);
      const modified = v !== undefined;
      if (box) box.classList.toggle("modified", modified);
      if (modified) { values[field.key] = v; changed++; }
    }
    const tag = document.getElementById("changed-" + safeId(group.name));
    if (tag) tag.textContent = changed ? `${changed} changed` : "";
  }
  return { selection: sentSelection(), values, extra: $("#extra-overrides").value, hardware: state.hardware,
    config_dir: state.configDir };
}

// the experiment, and only the group options the user changed from what it picks (what you pick is what runs)
function sentSelection() {
  const selection = {};
  const source = state.sources.find((x) => x.value === $("#experiment").value);
  if (source) selection.experiment = source.name;
  for (const [g, o] of Object.entries(state.selection)) {
    if (o && o !== state.expChoices[g]) selection[g] = o;
  }
  return selection;
}

// the groups and the untouched fields follow the composed config of the chosen experiment and options
async function recompose(experimentChanged = false) {
  const selection = experimentChanged ? {} : sentSelection();
  const source = state.sources.find((x) => x.value === $("#experiment").value);
  if (experimentChanged && source) selection.experiment = source.name;
  const seq = ++recompose.seq;
  $("#compose-status").textContent = "composing…";
  $("#compose-status").className = "status-line";
  const { ok, data } = await api("/api/form/values", { method: "POST", body: { selection, config_dir: state.configDir } });
  if (seq !== recompose.seq) return;
  if (!ok) { showProblems({ ok: false, problems: [{ field: "experiment", message: data.error }], command: $("#command").textContent }); return; }
  if (experimentChanged) state.expChoices = { ...data.choices };
  for (const [g, o] of Object.entries(data.choices || {})) {
    state.selection[g] = o;
    const sel = document.getElementById("option-" + safeId(g));
    if (sel) sel.value = o;
  }
  for (const group of state.spec.groups) {
    for (const field of group.fields || []) {
      if (!(field.key in (data.values || {}))) continue;
      const text = fieldText(data.values[field.key]);
      if (fieldValue(field) === undefined) setField(field, text);  // untouched: follows; changed: kept
      state.base[field.key] = text;
    }
  }
  collect();
  schedulePreview();
}
recompose.seq = 0;

function showProblems(result) {
  for (const el of $$(".problem")) el.textContent = "";
  for (const el of $$(".invalid")) el.classList.remove("invalid");
  const general = [];
  for (const p of result.problems || []) {
    const key = p.field;
    const slot = key ? document.getElementById("problem-" + safeId(key)) : null;
    if (slot) {
      slot.textContent = slot.textContent ? slot.textContent + " " + p.message : p.message;
      const input = document.getElementById("field-" + safeId(key));
      if (input) input.classList.add("invalid");
      const card = slot.closest(".group");
      if (card) card.classList.remove("collapsed");
    } else {
      general.push(key ? `${key}: ${p.message}` : p.message);
    }
  }
  const box = $("#general-problems");
  box.textContent = "";
  if (general.length) box.append(h("ul", {}, general.map((m) => h("li", { text: m }))));
  $("#command").textContent = result.command || "";
  const status = $("#compose-status");
  const n = (result.problems || []).length;
  status.textContent = result.ok ? "valid: ready to launch" : `${n} problem${n === 1 ? "" : "s"}`;
  status.className = "status-line " + (result.ok ? "ok" : "bad");
  const fc = result.forecast, warnings = (fc && fc.warnings) || [];
  $("#forecast").textContent = fc ? [fc.line, ...warnings.map((w) => "WARNING: " + w)].join("\n") : "";
  $("#forecast").className = "status-line" + (warnings.length ? " bad" : "");
}

let previewTimer = null;
function onFieldChange() { collect(); schedulePreview(); }
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(() => compose(false), 600);
}

let composeSeq = 0;
async function compose(validateNow = true) {
  if (validateNow) {
    clearTimeout(previewTimer);
    $("#compose-status").textContent = "validating…";
    $("#compose-status").className = "status-line";
  }
  const body = collect();
  const seq = ++composeSeq;
  const { data } = await api("/api/compose", { method: "POST", body });
  if (seq !== composeSeq && !validateNow) return data;  // a newer composition is on its way
  // fields the user did not touch follow the chosen options (an experiment's rank, an optimizer's lr)
  for (const group of state.spec.groups) {
    for (const field of group.fields || []) {
      if (field.key in body.values || !data.values || !(field.key in data.values)) continue;
      const text = fieldText(data.values[field.key]);
      if (text !== state.base[field.key]) { state.base[field.key] = text; setField(field, text); }
    }
  }
  if (validateNow) showProblems(data);
  else {
    $("#command").textContent = data.command || $("#command").textContent;
    const status = $("#compose-status");
    if (status.textContent === "composing…") { status.textContent = "not validated yet"; status.className = "status-line"; }
  }
  return data;
}

async function launch() {
  const button = $("#btn-launch");
  button.disabled = true;
  try {
    const res = await api("/api/runs", { method: "POST", body: collect() });
    showProblems(res.data);
    if (res.ok) {
      toast(`launched ${res.data.id}`);
      state.selectedRun = res.data.id;
      showTab("runs");
    } else if (res.data.error) {
      toast(res.data.error, true);
    }
  } finally {
    button.disabled = false;
  }
}

function renderHardwareSummary() {
  const hw = state.hardware;
  const text = hw.mode === "manual" ? `manual: GPUs ${hw.selected.join(", ") || "(none ticked)"}` : hw.mode;
  const box = $("#hardware-summary");
  box.textContent = "";
  box.append(`Devices: ${text} — set on the `,
    h("a", { href: "#hardware", onclick: (e) => { e.preventDefault(); showTab("hardware"); } }, "Hardware page"),
    " (the run's trainer.devices, strategy and CUDA_VISIBLE_DEVICES).");
}

async function loadForm() {
  const { data } = await api("/api/form");
  state.spec = data;
  const exp = $("#experiment");
  exp.textContent = "";
  exp.append(h("option", { value: "", text: "none — the embedded tiny demo and the options below" }));
  state.sources = data.experiment_sources || [];
  const builtIn = state.sources.filter((e) => !e.config_dir);
  for (const e of builtIn) exp.append(h("option", { value: e.value, text: e.name }));
  for (const dir of data.config_dirs || []) {
    const mine = state.sources.filter((e) => e.config_dir === dir);
    if (mine.length) exp.append(h("optgroup", { label: "--config-dir " + dir }, mine.map((e) => h("option", { value: e.value, text: e.name }))));
  }
  exp.addEventListener("change", () => {
    const e = state.sources.find((x) => x.value === exp.value);
    state.configDir = e ? e.config_dir : null;
    $("#experiment-doc").textContent = e ? e.description || "" : "";
    recompose(true);
  });
  for (const g of data.groups) if (g.default_option) state.expChoices[g.name] = g.default_option;
  renderGroups();
  renderHardwareSummary();
  compose(false);
}

// -- Dataset check ---------------------------------------------------------------------------------
function sampleUrl(base, file) {
  const path = file.startsWith("/") ? file : base.replace(/\/[^/]*\.json$/, "") + "/" + file;
  return withToken("/api/dataset/file?path=" + encodeURIComponent(path));
}

async function checkDataset() {
  const out = $("#dataset-result");
  out.textContent = "";
  out.append(h("div", { class: "card muted", text: "checking…" }));
  const body = { path: $("#dataset-path").value, resolution: Number($("#dataset-resolution").value) || null,
    caption_strategy: $("#dataset-captions").value, instance_prompt: $("#dataset-prompt").value || null };
  const { ok, data } = await api("/api/dataset/check", { method: "POST", body });
  out.textContent = "";
  if (!ok) {
    out.append(h("div", { class: "card problems", testid: "dataset-error", text: data.error || "check failed" }));
    return;
  }
  if ((data.problems || []).length) {
    out.append(h("div", { class: "card problems", testid: "dataset-problems" },
      h("ul", {}, data.problems.map((p) => h("li", { text: typeof p === "string" ? p : p.message || JSON.stringify(p) })))));
  }
  if ((data.notes || []).length) {
    out.append(h("div", { class: "card notes", testid: "dataset-notes" }, h("h3", { text: "Notes" }),
      h("ul", {}, data.notes.map((n) => h("li", { text: n })))));
  }
  for (const b of data.backends || []) {
    const most = Math.max(1, ...(b.buckets || []).map((x) => x.count));
    out.append(h("div", { class: "card backend", testid: "backend-" + safeId(b.id) },
      h("h2", {}, b.id, " ", h("span", { class: "badge", text: b.kind || "image" })),
      h("div", { class: "stats" },
        h("div", { class: "stat" }, h("b", { testid: "backend-images", text: b.images ?? "—" }), h("span", { text: "images" })),
        h("div", { class: "stat" }, h("b", { text: (b.buckets || []).length }), h("span", { text: "buckets" })),
        h("div", { class: "stat" }, h("b", { text: (b.skipped || []).length }), h("span", { text: "skipped" }))),
      h("h3", { text: "Aspect buckets" }),
      h("div", { class: "buckets" }, (b.buckets || []).map((x) => h("div", { class: "bucket" },
        h("span", { class: "mono", text: `${x.width}×${x.height}` }),
        h("div", { class: "bar" }, h("i", { style: `width:${(100 * x.count) / most}%` })),
        h("span", { text: x.count })))),
      (b.samples || []).length ? h("h3", { text: "Samples" }) : null,
      h("div", { class: "samples" }, (b.samples || []).map((s) => h("div", { class: "sample" },
        h("img", { src: sampleUrl(data.path || body.path, s.file), alt: s.file, loading: "lazy" }),
        h("p", { class: "file", text: s.file.split("/").pop() }),
        h("p", { text: s.caption || "(no caption)" })))),
      (b.skipped || []).length ? h("h3", { text: "Skipped" }) : null,
      h("ul", { class: "skipped", testid: "skipped" }, (b.skipped || []).map((s) =>
        h("li", {}, h("span", { class: "mono", text: s.file }), " — ", h("span", { class: "reason", text: s.reason })))),
      (b.ignored || []).length ? h("h3", { text: "Not used" }) : null,
      h("ul", { class: "skipped", testid: "ignored" }, (b.ignored || []).map((s) =>
        h("li", {}, h("span", { class: "mono", text: s.file }), " — ", h("span", { class: "reason", text: s.reason }))))));
  }
}

// -- Hardware ------------------------------------------------------------------------------------
async function loadHardware() {
  const { data } = await api("/api/hardware");
  state.accelerators = data.accelerators || [];
  const body = $("#accelerators tbody");
  body.textContent = "";
  for (const a of state.accelerators) {
    body.append(h("tr", {},
      h("td", {}, h("input", { type: "checkbox", class: "hw-device", value: a.index, testid: "hw-device-" + a.index,
        checked: state.hardware.selected.includes(a.index), disabled: state.hardware.mode !== "manual", onchange: applyHardware })),
      h("td", { text: a.index }), h("td", { text: a.name }), h("td", { text: bytes(a.memory_bytes) })));
  }
  $("#no-accelerators").hidden = state.accelerators.length > 0;
  $("#accelerators").hidden = state.accelerators.length === 0;
  await applyHardware();
}

async function applyHardware() {
  const mode = $("input[name=hw-mode]:checked").value;
  for (const cb of $$(".hw-device")) cb.disabled = mode !== "manual";
  const selected = $$(".hw-device").filter((cb) => cb.checked).map((cb) => Number(cb.value));
  state.hardware = { mode, selected };
  renderHardwareSummary();
  const { ok, data } = await api("/api/hardware/choice", { method: "POST", body: state.hardware });
  const box = $("#hardware-choice");
  box.textContent = "";
  if (!ok) { box.append(h("p", { class: "problems", text: data.error })); return; }
  const env = Object.entries(data.env || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  box.append(h("dl", {},
    h("dt", { text: "runs use" }), h("dd", { testid: "hw-summary", text: data.summary || "—" }),
    h("dt", { text: "devices" }), h("dd", { testid: "hw-devices", text: JSON.stringify(data.devices) }),
    h("dt", { text: "strategy" }), h("dd", { text: data.strategy ?? "—" }),
    h("dt", { text: "overrides" }), h("dd", { text: (data.overrides || []).join(" ") || "(none)" }),
    h("dt", { text: "environment" }), h("dd", { text: env || "(unchanged)" })));
  schedulePreview();
}

// -- Runs ----------------------------------------------------------------------------------------
function runId(r) { return r.id ?? r.run_id ?? r.name; }

async function refreshRuns() {
  const { ok, data } = await api("/api/runs");
  if (!ok) return;
  state.runs = Array.isArray(data) ? data : data.runs || [];
  const list = $("#runs-list");
  list.textContent = "";
  const active = state.runs.filter((r) => ["running", "queued"].includes(r.status)).length;
  $("#runs-count").textContent = active || "";
  for (const r of state.runs) {
    const id = runId(r);
    const step = r.step ?? null;
    list.append(h("li", { class: id === state.selectedRun ? "selected" : "", testid: "run-row-" + safeId(id),
      onclick: () => { state.selectedRun = id; refreshRuns(); } },
      h("span", { class: "name", text: id }),
      h("span", { class: "meta" }, h("span", { class: "badge " + (r.status || ""), text: r.status || "?" }),
        step !== null ? h("span", { text: `step ${step}${r.max_steps ? " / " + r.max_steps : ""}` }) : null,
        r.queue_position ? h("span", { text: `#${r.queue_position} in queue` }) : null)));
  }
  if (!state.runs.length) list.append(h("li", { class: "muted", text: "no runs yet" }));
  if (state.selectedRun) await refreshRun();
}

function lossChart(metrics) {
  const series = [
    { name: "train", key: "loss/train", color: "var(--train)" },
    { name: "eval", key: "loss/val", color: "var(--val)" },
  ].map((s) => ({ ...s, points: (metrics[s.key] || []).filter((p) => p && isFinite(p[1])) }));
  const all = series.flatMap((s) => s.points);
  // drawn near its shown size (a card ~360 px wide), so 12-13 px labels stay 12-13 px on screen
  const W = 380, H = 240, L = 60, R = 10, T = 10, B = 42;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("data-testid", "loss-chart");
  svg.id = "loss-chart";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  el("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fbfbfe", stroke: "#e2e5ec" });
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7385", "font-size": 13 }, "no loss logged yet");
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eceef3" });
    el("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 12, fill: "#4a5163" }, y.toPrecision(3));
  }
  // step ticks: whole steps, 1/2/5 x 10^k apart, about five of them
  const raw = (x1 - x0) / 5, mag = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
  const every = Math.max(1, [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw) || 10 * mag);
  for (let x = Math.ceil(x0 / every) * every; x <= x1; x += every) {
    el("line", { x1: sx(x), x2: sx(x), y1: H - B, y2: H - B + 4, stroke: "#b9bfcc" });
    el("text", { x: sx(x), y: H - B + 18, "text-anchor": "middle", "font-size": 12, fill: "#4a5163" }, String(x));
  }
  el("text", { x: L + (W - L - R) / 2, y: H - 6, "text-anchor": "middle", "font-size": 13, fill: "#2b3142" }, "step");
  el("text", { x: 14, y: T + (H - T - B) / 2, "text-anchor": "middle", "font-size": 13, fill: "#2b3142",
    transform: `rotate(-90 14 ${T + (H - T - B) / 2})` }, "loss");
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    el("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name, class: "series-" + s.name });
    for (const p of s.points.length <= 40 ? s.points : []) {
      el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color });
    }
  }
  return svg;
}

// a run id is its dir under outputs/ (runs/demo): each folder encoded, the slashes kept
function idPath(id) { return String(id).split("/").map(encodeURIComponent).join("/"); }

function fileUrl(id, relpath, download = false) {
  const parts = String(relpath).split("/").map(encodeURIComponent).join("/");
  return withToken(`/api/runs/${idPath(id)}/files/${parts}${download ? "?download=1" : ""}`);
}

async function refreshRun() {
  const id = state.selectedRun;
  const { ok, data: run } = await api("/api/runs/" + idPath(id));
  const root = $("#run-detail");
  if (!ok) { root.textContent = ""; root.append(h("div", { class: "card problems", text: run.error || "run not found" })); return; }
  const keepScroll = $("#log-tail") ? $("#log-tail").scrollTop : null;
  const atBottom = $("#log-tail") ? $("#log-tail").scrollHeight - $("#log-tail").scrollTop - $("#log-tail").clientHeight < 20 : true;
  let status = run.status || "?";
  const pending = state.pending[id];
  if (pending && pending.from === status && Date.now() < pending.until) status = pending.text;  // asked, not seen yet
  else delete state.pending[id];
  const live = ["running", "queued", "stopping…", "starting…"].includes(status);
  const finished = status === "finished";
  const metrics = run.metrics || {};
  const train = metrics["loss/train"] || [];
  const val = metrics["loss/val"] || [];
  const clip = metrics["clip/mean"] || [];
  const last = (xs) => (xs.length ? xs[xs.length - 1][1] : null);
  const step = run.step ?? (train.length ? train[train.length - 1][0] : null);
  const images = (run.images || []).slice().sort((a, b) => b.step - a.step);
  const checkpoints = run.checkpoints || [];
  const frag = [
    h("div", { class: "card" },
      h("div", { class: "run-head" },
        h("h1", { text: runId(run) || id }),
        h("span", { class: "badge " + status, id: "run-status", testid: "run-status", text: status }),
        h("div", { class: "buttons" },
          h("button", { class: "danger", id: "btn-stop", testid: "stop", disabled: !live || status === "stopping…",
            onclick: (e) => stop(id, run.status, e.target) }, "Stop"),
          h("button", { class: "secondary", id: "btn-resume", testid: "resume", disabled: live || finished || !checkpoints.length,
            title: finished ? "the run finished: nothing to resume (launch it again with a higher trainer.max_steps)" : null,
            onclick: (e) => resume(id, null, run.status, e.target) }, "Resume"),
          h("a", { class: "download" + (run.lora ? "" : " disabled"), id: "lora-download", testid: "lora-download",
            title: run.lora ? "the adapter file exported with the checkpoint of that step" : "written with each checkpoint and at the end",
            href: run.lora ? withToken(`/api/runs/${idPath(id)}/lora`) : "#", download: "" },
            run.lora ? `Download LoRA${run.lora_step !== null && run.lora_step !== undefined ? " (step " + run.lora_step + ")" : ""}` : "Download LoRA"))),
      run.max_steps && step !== null ? h("div", { class: "progress" }, h("i", { style: `width:${Math.min(100, (100 * step) / run.max_steps)}%` })) : null,
      h("div", { class: "kv" },
        h("div", {}, h("span", { text: "step" }), h("b", { testid: "run-step", text: step === null ? "—" : `${step}${run.max_steps ? " / " + run.max_steps : ""}` })),
        h("div", {}, h("span", { text: "train loss" }), h("b", { text: fmt(last(train)) })),
        h("div", {}, h("span", { text: "eval loss" }), h("b", { text: fmt(last(val)) })),
        h("div", {}, h("span", { text: "CLIP score" }), h("b", { id: "clip-score", testid: "clip-score", text: fmt(last(clip)) })),
        run.queue_position ? h("div", {}, h("span", { text: "queue" }), h("b", { text: "#" + run.queue_position })) : null),
      run.command ? h("pre", { class: "command", style: "margin-top:12px", testid: "run-command", text: run.command }) : null),
    h("div", { class: "grid2" },
      h("div", { class: "card chart" }, h("h2", { text: "Loss" }), lossChart(metrics),
        h("div", { class: "legend" }, h("span", {}, h("i", { style: "background:var(--train)" }), "train"),
          h("span", {}, h("i", { style: "background:var(--val)" }), "eval"))),
      h("div", { class: "card" }, h("h2", { text: "Validation images" }),
        h("div", { class: "steps", id: "validation-images", testid: "validation-images" },
          images.length ? images.map((g) => h("div", { class: "step-row", testid: "validation-step-" + g.step },
            h("h3", { text: `step ${g.step}` }),
            h("div", { class: "imgs" }, g.files.map((f) => h("figure", {},
              h("a", { href: fileUrl(id, f), target: "_blank" }, h("img", { src: fileUrl(id, f), alt: f, title: f })),
              h("figcaption", { text: f.split("/").pop().replace(/\.png$/, "") }))))))
            : h("p", { class: "muted", text: "none yet" })))),
    h("div", { class: "grid2" },
      h("div", { class: "card checkpoints" }, h("h2", { text: "Checkpoints" }),
        checkpoints.length
          ? h("ul", { testid: "checkpoints" }, checkpoints.map((c) => h("li", {},
              h("span", {}, h("span", { class: "mono", text: c.file.split("/").pop() }), " ",
                h("span", { class: "muted", text: c.step !== null && c.step !== undefined ? `step ${c.step}` : "" })),
              h("button", { class: "ghost small", testid: "resume-from-" + safeId(c.file.split("/").pop()), disabled: live || finished,
                onclick: (e) => resume(id, c.file, run.status, e.target) }, "Resume from here"))))
          : h("p", { class: "muted", text: "none yet" })),
      h("div", { class: "card" }, h("h2", {}, "Log ", run.log ? h("a", { class: "small", href: withToken(`/api/runs/${idPath(id)}/log`), target: "_blank", text: "(full)" }) : null),
        attemptPicker(id, run.attempts || []),
        h("pre", { class: "log", id: "log-tail", testid: "log-tail", text: logText(id, run) }))),
  ];
  root.textContent = "";
  root.append(...frag);
  const row = document.querySelector(`[data-testid="run-row-${safeId(id)}"] .badge`);
  if (row && row.textContent !== status) { row.textContent = status; row.className = "badge " + status; }
  const logEl = $("#log-tail");
  if (atBottom) logEl.scrollTop = logEl.scrollHeight;
  else if (keepScroll !== null) logEl.scrollTop = keepScroll;
}

// every attempt (launch) keeps its log: the latest is followed live, an earlier one is shown whole
function attemptPicker(id, attempts) {
  if (attempts.length < 2) return null;
  const chosen = state.logAttempt[id] || "";
  const sel = h("select", { class: "small", testid: "log-attempt", onchange: async (e) => {
    state.logAttempt[id] = e.target.value || null;
    if (e.target.value && !(e.target.value in state.logCache)) {
      const res = await fetch(withToken(`/api/runs/${idPath(id)}/log?attempt=${encodeURIComponent(e.target.value)}`));
      state.logCache[e.target.value] = res.ok ? await res.text() : "(no log)";
    }
    refreshRun();
  } }, attempts.map((a, i) => h("option", { value: i === attempts.length - 1 ? "" : a.key,
    text: (a.label || `attempt ${i + 1}`) + (i === attempts.length - 1 ? " (latest)" : "") })));
  sel.value = chosen;
  return h("div", { class: "attempts" }, sel);
}

function logText(id, run) {
  const key = state.logAttempt[id];
  return key ? state.logCache[key] ?? "loading…" : run.log_tail || "";
}

// Stop/Resume answer at once: the badge says what was asked until the run's status changes (at most 15 s)
async function stop(id, from, button) {
  if (button) button.disabled = true;
  state.pending[id] = { text: "stopping…", from, until: Date.now() + 15000 };
  refreshRun();
  const r = await api(`/api/runs/${idPath(id)}/stop`, { method: "POST" });
  if (!r.ok) delete state.pending[id];
  toast(r.ok ? "stopping: a checkpoint is written first" : r.data.error, !r.ok);
  refreshRuns();
}

async function resume(id, checkpoint, from, button) {
  if (button) button.disabled = true;
  state.pending[id] = { text: "starting…", from, until: Date.now() + 15000 };
  state.logAttempt[id] = null;
  refreshRun();
  const r = await api(`/api/runs/${idPath(id)}/resume`, { method: "POST", body: { checkpoint } });
  if (!r.ok) delete state.pending[id];
  toast(r.ok ? `resuming ${id}${checkpoint ? " from " + checkpoint.split("/").pop() : ""}` : r.data.error, !r.ok);
  refreshRuns();
}

// -- start ---------------------------------------------------------------------------------------
function start() {
  for (const t of $$(".tab")) t.addEventListener("click", () => showTab(t.dataset.tab));
  $("#btn-validate").addEventListener("click", () => compose(true));
  $("#btn-launch").addEventListener("click", launch);
  $("#extra-overrides").addEventListener("input", schedulePreview);
  $("#copy-command").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("#command").textContent));
  $("#btn-dataset-check").addEventListener("click", checkDataset);
  $("#dataset-path").addEventListener("keydown", (e) => { if (e.key === "Enter") checkDataset(); });
  for (const r of $$("input[name=hw-mode]")) r.addEventListener("change", applyHardware);
  loadForm().catch((e) => toast("could not load the form: " + e, true));
  const first = (location.hash || "#new").slice(1);
  showTab(["new", "dataset", "hardware", "runs"].includes(first) ? first : "new");
  setInterval(() => { if (state.tab === "runs") refreshRuns(); }, 1000);
}
document.addEventListener("DOMContentLoaded", start);
