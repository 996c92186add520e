// The ModelDock console: one more client of the server's public APIs (KServe v2 HTTP, /metrics, OpenAI /v1).
// Nothing here is privileged: restricted routes get the header the user typed in, or are refused by the server.
"use strict";

const POLL_MS = 2000;
const CHART_POINTS = 90;
const LANGUAGE_TASKS = ["generate", "embed"];

const state = {
  settings: null,        // /console/settings.json
  credentials: {},       // header name -> value, and "openai" -> key
  models: [],            // repository index rows
  configs: {},           // "name/version" -> config JSON (ready models only)
  metrics: null,         // the last /metrics scrape, parsed
  metricsError: "",
  series: {},            // model name -> {t: [], ...} points for the charts
  selected: null,        // model name
  tab: "overview",
  charts: [],
  probes: {},            // model name -> {tools, json_schema} support found by probing /v1/chat/completions
  busy: {},              // model name -> action in flight
};

// -- requests ------------------------------------------------------------------------------------------------
function authHeaders(path) {
  const headers = {};
  for (const [group, header] of Object.entries(state.settings.restricted)) {
    if (state.credentials[header] && groupOf(path) === group) headers[header] = state.credentials[header];
  }
  if (path.startsWith("/v1/") && state.credentials.openai) headers.Authorization = "Bearer " + state.credentials.openai;
  return headers;
}

// The API group of a route, as the server classifies it (server/frontends/restrictions.py: http_group).
function groupOf(path) {
  if (path.startsWith("/v1/")) return "inference";
  if (path === "/metrics") return "statistics";
  if (!path.startsWith("/v2")) return null;
  const rest = path.slice(3);
  if (rest === "" || rest === "/") return "metadata";
  if (rest.startsWith("/health/")) return "health";
  if (rest.startsWith("/repository/")) return "model-repository";
  if (rest.startsWith("/models/")) {
    if (rest.endsWith("/stats")) return "statistics";
    if (/\/(infer|generate|generate_stream)$/.test(rest)) return "inference";
    if (rest.endsWith("/ready")) return "health";
    if (rest.endsWith("/config")) return "model-config";
    return "metadata";
  }
  return null;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(path), ...(options.headers || {}) };
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || (body ? "POST" : "GET"), headers, body });
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const data = JSON.parse(text);
    if (typeof data.error === "string") return data.error;
    if (data.error && data.error.message) return data.error.message;
  } catch (_) { /* not JSON: the text itself */ }
  return text || response.statusText;
}

function toast(message, bad = false) {
  const item = document.createElement("div");
  item.textContent = message;
  if (bad) item.className = "bad";
  document.getElementById("toast").appendChild(item);
  setTimeout(() => item.remove(), bad ? 8000 : 3000);
}

// -- credentials ---------------------------------------------------------------------------------------------
function loadCredentials() {
  try { state.credentials = JSON.parse(sessionStorage.getItem("modeldock.credentials") || "{}"); }
  catch (_) { state.credentials = {}; }
}

function credentialNames() {
  const names = [...new Set(Object.values(state.settings.restricted))].map((h) => [h, `Header ${h}`]);
  if (state.settings.openai_key_required) names.push(["openai", "OpenAI API key (/v1)"]);
  return names;
}

function openCredentials() {
  const fields = document.getElementById("credential-fields");
  fields.replaceChildren();
  const names = credentialNames();
  if (!names.length) fields.append(el("p", {}, "This server restricts nothing: no credentials are needed."));
  for (const [key, label] of names) {
    const input = el("input", { type: "password", id: "credential-" + key, "data-key": key, value: state.credentials[key] || "" });
    fields.append(el("div", { class: "field" }, el("label", { for: input.id }, label), input));
  }
  document.getElementById("credentials").showModal();
}

function saveCredentials(event) {
  if (event.submitter && event.submitter.value !== "save") return;
  for (const input of document.querySelectorAll("#credential-fields input")) {
    state.credentials[input.dataset.key] = input.value;
  }
  sessionStorage.setItem("modeldock.credentials", JSON.stringify(state.credentials));
  state.probes = {};
  renderAccess();
  refresh();
}

// Whether this console may load and unload: explicit mode, and the repository group's header if it is restricted.
function canControl() {
  if (state.settings.model_control_mode !== "explicit") return false;
  const header = state.settings.restricted["model-repository"];
  return !header || Boolean(state.credentials[header]);
}

function renderAccess() {
  const badge = document.getElementById("access");
  const mode = state.settings.model_control_mode;
  if (mode !== "explicit") {
    badge.textContent = `${mode} mode: read only`;
    badge.title = "Models follow the repository; start the server with --model-control-mode explicit to load and unload here.";
  } else {
    badge.textContent = canControl() ? "explicit mode: can load and unload" : "explicit mode: read only (no key)";
    badge.title = canControl() ? "" : "The model-repository API is restricted: enter its header under Credentials.";
  }
}

// -- helpers -------------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function pretty(value) { return JSON.stringify(value, null, 2); }

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits);
}

// Prometheus text format: name{labels} value, one sample a line (comments skipped).
function parseMetrics(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    (samples[match[1]] ||= []).push({ labels, value: parseFloat(match[3]) });
  }
  return samples;
}

// The sum of a metric's samples for one model (every version and label set), or null when it has none.
function metric(name, model, filter = () => true) {
  const list = state.metrics && state.metrics[name];
  if (!list) return null;
  let total = null;
  for (const sample of list) {
    if (sample.labels.model === model && filter(sample.labels)) total = (total || 0) + sample.value;
  }
  return total;
}

function configOf(row) { return state.configs[`${row.name}/${row.version}`]; }

function taskOf(config) {
  const task = config && config.parameters && config.parameters.task;
  return task ? task.string_value || "" : "";
}

function instancesOf(config) {
  if (!config) return "";
  if (config.platform === "ensemble") return "steps";
  const groups = config.instance_group || [];
  if (!groups.length) return LANGUAGE_TASKS.includes(taskOf(config)) ? "1 engine" : "1";
  return groups.map((g) => `${g.count} × ${(g.kind || "KIND_AUTO").replace("KIND_", "")}`).join(", ");
}

// -- polling -------------------------------------------------------------------------------------------------
async function refresh() {
  try {
    state.metrics = parseMetrics(await (await api("/metrics")).text());
    state.metricsError = "";
  } catch (error) {
    state.metrics = null;
    state.metricsError = `Metrics unavailable: ${error.message}`;
  }
  const note = document.getElementById("models-note");
  try {
    state.models = await (await api("/v2/repository/index", { json: {} })).json();
    note.textContent = "";
  } catch (error) {
    // A restricted repository index still leaves the loaded models visible through the metrics, if those are open.
    state.models = state.metrics ? loadedFromMetrics() : [];
    note.textContent = error.status === 403
      ? `The repository index needs the model-repository key (${error.message}); showing the loaded models, from /metrics.`
      : `Repository index: ${error.message}`;
  }
  await Promise.all(state.models.filter((r) => r.state === "READY" && !configOf(r)).map(async (row) => {
    try { state.configs[`${row.name}/${row.version}`] = await (await api(`/v2/models/${row.name}/versions/${row.version}/config`)).json(); }
    catch (_) { /* restricted or gone: the row shows what the index says */ }
  }));
  if (state.metrics) record();
  renderModels();
  if (state.selected) renderOverview();
}

// The versions the metrics report on are the loaded ones.
function loadedFromMetrics() {
  const seen = new Map();
  for (const sample of state.metrics.nv_inference_request_success || []) {
    const { model, version } = sample.labels;
    seen.set(`${model}/${version}`, { name: model, version, state: "READY", reason: "" });
  }
  return [...seen.values()].sort((a, b) => a.name.localeCompare(b.name));
}

// Rates from the counters between two scrapes: the charts show what happened in each interval.
function record() {
  const now = Date.now() / 1000;
  for (const row of state.models) {
    const name = row.name;
    const counters = {
      success: metric("nv_inference_request_success", name),
      duration: metric("nv_inference_request_duration_us", name),
      tokens: metric("modeldock_llm_generation_tokens_total", name),
      ttftSum: metric("modeldock_llm_time_to_first_token_seconds_sum", name),
      ttftCount: metric("modeldock_llm_time_to_first_token_seconds_count", name),
    };
    const series = (state.series[name] ||= { t: [], rps: [], latency: [], tokens: [], ttft: [], last: null });
    const last = series.last;
    series.last = { now, ...counters };
    if (!last) continue;
    const dt = now - last.now;
    const delta = (key) => (counters[key] === null || last[key] === null ? null : counters[key] - last[key]);
    const requests = delta("success");
    series.t.push(now);
    series.rps.push(requests === null ? null : requests / dt);
    series.latency.push(requests ? delta("duration") / requests / 1000 : null);
    series.tokens.push(delta("tokens") === null ? null : delta("tokens") / dt);
    const firsts = delta("ttftCount");
    series.ttft.push(firsts ? (delta("ttftSum") / firsts) * 1000 : null);
    for (const key of ["t", "rps", "latency", "tokens", "ttft"]) if (series[key].length > CHART_POINTS) series[key].shift();
  }
}

// -- the model table -----------------------------------------------------------------------------------------
function renderModels() {
  const body = document.querySelector("#models tbody");
  body.replaceChildren();
  for (const row of state.models) {
    const config = configOf(row);
    const queue = metric("nv_inference_pending_request_count", row.name) ?? 0;
    const waiting = metric("modeldock_llm_requests_waiting", row.name) ?? 0;
    const ready = row.state === "READY";
    const explicit = state.settings.model_control_mode === "explicit";
    const allowed = canControl() && !state.busy[row.name];
    const why = explicit ? "needs the model-repository key (Credentials)" : "only in explicit model control mode";
    const button = (label, action, show) => show
      ? el("button", { type: "button", "data-action": action, disabled: !allowed, title: allowed ? "" : why,
          onclick: (e) => { e.stopPropagation(); control(row.name, action); } }, label)
      : null;
    const tr = el("tr", { "data-model": row.name, class: row.name === state.selected ? "selected" : null },
      el("td", {}, el("b", {}, row.name)),
      el("td", {}, row.version || "–"),
      el("td", {}, config ? config.backend || config.platform || "ensemble" : "–"),
      el("td", {}, el("span", { class: `badge state-${row.state}`, "data-state": row.state }, row.state),
        row.reason ? el("div", { class: "reason" }, row.reason) : null),
      el("td", {}, instancesOf(config) || "–"),
      el("td", {}, ready ? String(queue + waiting) : "–"),
      el("td", { class: "actions" },
        button("Load", "load", !ready),
        button("Reload", "load", ready),
        button("Unload", "unload", ready),
        state.busy[row.name] ? el("span", { class: "muted" }, state.busy[row.name] + "…") : null));
    tr.addEventListener("click", () => select(row.name));
    body.append(tr);
  }
  if (state.metricsError) document.getElementById("models-note").append(" " + state.metricsError);
}

async function control(name, action) {
  state.busy[name] = action === "load" ? "loading" : "unloading";
  renderModels();
  try {
    await api(`/v2/repository/models/${name}/${action}`, { json: {} });
    toast(`${name}: ${action === "load" ? "loaded" : "unloaded"}`);
    for (const key of Object.keys(state.configs)) if (key.startsWith(name + "/")) delete state.configs[key];
    delete state.probes[name];
  } catch (error) {
    toast(`${name}: ${action} failed: ${error.message}`, true);
  } finally {
    delete state.busy[name];
    await refresh();
    if (state.selected === name) renderDetail();
  }
}

// -- the detail panel ----------------------------------------------------------------------------------------
function select(name) {
  state.selected = name;
  document.getElementById("detail").hidden = false;
  renderModels();
  renderDetail();
}

function selectedRow() { return state.models.find((r) => r.name === state.selected); }

function showTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  for (const panel of document.querySelectorAll(".tab")) panel.hidden = panel.id !== "tab-" + tab;
  if (tab === "overview") renderOverview(true);
}

async function renderDetail() {
  const row = selectedRow();
  if (!row) return;
  document.getElementById("detail-title").textContent = `${row.name}${row.version ? " · version " + row.version : ""}`;
  const config = configOf(row);
  document.getElementById("config-json").textContent = config ? pretty(config) : `Not loaded (${row.state}).`;
  const metadataBox = document.getElementById("metadata-json");
  let metadata = null;
  if (row.state === "READY") {
    try { metadata = await (await api(`/v2/models/${row.name}`)).json(); metadataBox.textContent = pretty(metadata); }
    catch (error) { metadataBox.textContent = error.message; }
  } else {
    metadataBox.textContent = `Not loaded (${row.state}).`;
  }
  renderPlayground(row, config, metadata);
  showTab(state.tab);
}

function renderOverview(rebuild = false) {
  const row = selectedRow();
  if (!row) return;
  const config = configOf(row);
  const language = taskOf(config) === "generate";
  const series = state.series[row.name];
  const summary = document.getElementById("summary");
  const last = (key) => (series && series[key].length ? series[key][series[key].length - 1] : null);
  const items = [
    ["State", row.state], ["Instances", instancesOf(config) || "–"],
    ["Requests", metric("nv_inference_request_success", row.name) ?? "–"],
    ["Failures", metric("nv_inference_request_failure", row.name) ?? "–"],
    ["Requests/s", fmt(last("rps"), 2)], ["Latency ms", fmt(last("latency"))],
  ];
  if (language) items.push(["Tokens/s", fmt(last("tokens"))], ["TTFT ms", fmt(last("ttft"))]);
  summary.replaceChildren(...items.map(([label, value]) => el("div", {}, el("b", {}, String(value)), el("span", { class: "muted" }, label))));
  document.getElementById("charts-note").textContent = state.metricsError ||
    "From the server's Prometheus metrics, sampled every 2 s: each point is the interval since the previous one.";
  const wanted = [["rps", "Requests / s"], ["latency", "Mean request latency (ms)"]];
  if (language) wanted.push(["tokens", "Generated tokens / s"], ["ttft", "Mean time to first token (ms)"]);
  const key = row.name + "|" + wanted.map((w) => w[0]).join(",");
  if (rebuild || state.chartsKey !== key) buildCharts(wanted, key);
  if (!series) return;
  for (const chart of state.charts) chart.plot.setData([series.t, series[chart.key]]);
}

function buildCharts(wanted, key) {
  for (const chart of state.charts) chart.plot.destroy();
  const box = document.getElementById("charts");
  box.replaceChildren();
  state.chartsKey = key;
  const width = Math.max(220, Math.floor((box.clientWidth || 560) / 2) - 12);
  state.charts = wanted.map(([seriesKey, title]) => {
    const holder = el("div", { class: "chart", "data-chart": seriesKey }, el("h3", {}, title));
    box.append(holder);
    const plot = new uPlot({
      width, height: 140, legend: { show: false }, cursor: { show: false },
      scales: { y: { range: (_, min, max) => [0, Math.max(max || 0, 1e-9) * 1.15] } },
      axes: [{ size: 24 }, { size: 44 }],
      series: [{}, { stroke: "#3f51b5", fill: "rgba(63,81,181,0.12)", width: 1.5, spanGaps: false }],
    }, [[], []], holder);
    return { key: seriesKey, plot };
  });
}

// -- playgrounds ---------------------------------------------------------------------------------------------
function renderPlayground(row, config, metadata) {
  const box = document.getElementById("tab-playground");
  box.replaceChildren();
  if (row.state !== "READY" || !config || !metadata) {
    box.append(el("p", { class: "muted" }, "The playground needs the model loaded (READY)."));
    return;
  }
  const task = taskOf(config);
  const routes = state.settings.openai_routes;
  if (task === "generate") chatPlayground(box, row);
  else if (task === "embed") embeddingPlayground(box, row);
  else if (/transcri|asr/.test(task) && routes.includes("/v1/audio/transcriptions")) audioPlayground(box, row);
  else if (/speak|tts|text-to-speech/.test(task) && routes.includes("/v1/audio/speech")) speechPlayground(box, row);
  else if (/image|diffusion/.test(task) && routes.includes("/v1/images/generations")) imagePlayground(box, row);
  else tensorPlayground(box, row, metadata);
}

function chatPlayground(box, row) {
  const messages = [];
  const log = el("div", { class: "messages", id: "chat-messages" });
  const prompt = el("textarea", { id: "chat-input", rows: 3, placeholder: "Say something to the model" });
  const maxTokens = el("input", { type: "number", id: "chat-max-tokens", value: 32, min: 1, style: "width:6em" });
  const temperature = el("input", { type: "number", id: "chat-temperature", value: 0.7, min: 0, step: 0.1, style: "width:5em" });
  const send = el("button", { type: "button", class: "primary", id: "chat-send" }, "Send");
  const extras = el("div", { id: "chat-extras" });
  const status = el("span", { class: "muted", id: "chat-status" });
  box.append(el("div", { class: "chat" }, log, prompt,
    el("div", { class: "row" }, el("label", { for: maxTokens.id }, "max tokens"), maxTokens,
      el("label", { for: temperature.id }, "temperature"), temperature, send, status), extras));
  probeChat(row.name).then((probe) => addChatExtras(extras, probe));

  const show = (role, text) => {
    const span = el("span", { class: "text" }, text);
    log.append(el("div", { class: "message " + role }, el("span", { class: "role" }, role), span));
    log.scrollTop = log.scrollHeight;
    return span;
  };
  send.addEventListener("click", async () => {
    if (!prompt.value.trim()) return;
    const attached = extras.querySelector("#chat-image");
    if (attached && attached.files.length) {
      const url = await readAsDataUrl(attached.files[0]);
      messages.push({ role: "user", content: [{ type: "image_url", image_url: { url } }, { type: "text", text: prompt.value }] });
      show("user", prompt.value).before(el("img", { class: "attached", src: url, alt: attached.files[0].name }));
      attached.value = "";
    } else {
      messages.push({ role: "user", content: prompt.value });
      show("user", prompt.value);
    }
    prompt.value = "";
    const out = show("assistant", "");
    send.disabled = true;
    status.textContent = "streaming…";
    const started = performance.now();
    let first = null;
    let chunks = 0;
    try {
      const body = { model: row.name, messages, stream: true, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
      Object.assign(body, chatExtras(extras));
      const response = await api("/v1/chat/completions", { json: body });
      for await (const event of serverSentEvents(response)) {
        if (event === "[DONE]") break;
        const data = JSON.parse(event);
        if (data.error) throw new Error(data.error.message || String(data.error));
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (!delta) continue;
        const piece = delta.content || (delta.tool_calls ? JSON.stringify(delta.tool_calls) : "");
        if (piece) {
          if (first === null) first = performance.now();
          chunks += 1;
          out.textContent += piece;
          log.scrollTop = log.scrollHeight;
        }
      }
      messages.push({ role: "assistant", content: out.textContent });
      const total = (performance.now() - started) / 1000;
      status.textContent = first === null ? "no text" :
        `first text after ${((first - started)).toFixed(0)} ms, ${chunks} chunks in ${total.toFixed(2)} s`;
      out.parentElement.dataset.done = "true";
    } catch (error) {
      out.parentElement.classList.add("error");
      out.textContent = error.message;
      out.parentElement.dataset.done = "true";
      status.textContent = "";
    } finally {
      send.disabled = false;
    }
  });
}

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

// Whether the chat route takes tools and JSON-schema response formats for this model: a one-token request each,
// once per model, so the toggles appear exactly where the server accepts them.
async function probeChat(name) {
  if (state.probes[name]) return state.probes[name];
  const base = { model: name, messages: [{ role: "user", content: "hi" }], max_tokens: 1 };
  const accepts = async (extra) => {
    try { await api("/v1/chat/completions", { json: { ...base, ...extra } }); return true; }
    catch (_) { return false; }
  };
  const picture = { type: "image_url", image_url: { url: probeImage() } };
  const [tools, jsonSchema, vision] = await Promise.all([
    accepts({ tools: [{ type: "function", function: { name: "probe", parameters: { type: "object", properties: {} } } }] }),
    accepts({ response_format: { type: "json_schema", json_schema: { name: "probe", schema: { type: "object" } } } }),
    accepts({ messages: [{ role: "user", content: [picture, { type: "text", text: "hi" }] }] }),
  ]);
  state.probes[name] = { tools, jsonSchema, vision };
  return state.probes[name];
}

// A small grey PNG, drawn here, for the vision probe.
function probeImage() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 32;
  const context = canvas.getContext("2d");
  context.fillStyle = "#808080";
  context.fillRect(0, 0, 32, 32);
  return canvas.toDataURL("image/png");
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addChatExtras(extras, probe) {
  extras.replaceChildren();
  if (probe.vision) {
    const file = el("input", { type: "file", id: "chat-image", accept: "image/*" });
    extras.append(el("div", { class: "field" }, el("label", { for: file.id }, "attach an image to the next message"), file));
  }
  if (probe.jsonSchema) {
    const toggle = el("input", { type: "checkbox", id: "chat-json-schema-on" });
    const schema = el("textarea", { id: "chat-json-schema", rows: 4, hidden: true },
      pretty({ type: "object", properties: { answer: { type: "string" } }, required: ["answer"] }));
    toggle.addEventListener("change", () => { schema.hidden = !toggle.checked; });
    extras.append(el("div", { class: "field" }, el("label", {}, toggle, " answer with JSON matching a schema"), schema));
  }
  if (probe.tools) {
    const toggle = el("input", { type: "checkbox", id: "chat-tools-on" });
    const tools = el("textarea", { id: "chat-tools", rows: 6, hidden: true }, pretty([{ type: "function", function: {
      name: "get_weather", description: "The weather in a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }]));
    toggle.addEventListener("change", () => { tools.hidden = !toggle.checked; });
    extras.append(el("div", { class: "field" }, el("label", {}, toggle, " offer tools"), tools));
  }
}

function chatExtras(extras) {
  const body = {};
  const schemaOn = extras.querySelector("#chat-json-schema-on");
  if (schemaOn && schemaOn.checked) {
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(extras.querySelector("#chat-json-schema").value) } };
  }
  const toolsOn = extras.querySelector("#chat-tools-on");
  if (toolsOn && toolsOn.checked) body.tools = JSON.parse(extras.querySelector("#chat-tools").value);
  return body;
}

function embeddingPlayground(box, row) {
  const input = el("textarea", { id: "embed-input", rows: 3 }, "ModelDock serves models.");
  const run = el("button", { type: "button", class: "primary", id: "embed-run" }, "Embed");
  const out = el("pre", { id: "embed-output" });
  box.append(el("div", { class: "field" }, el("label", { for: input.id }, "Text"), input), run, out);
  run.addEventListener("click", async () => {
    try {
      const data = await (await api("/v1/embeddings", { json: { model: row.name, input: input.value } })).json();
      const vector = data.data[0].embedding;
      out.textContent = `${vector.length} dimensions\n[${vector.slice(0, 8).map((v) => v.toFixed(4)).join(", ")}, …]`;
    } catch (error) { out.textContent = error.message; }
  });
}

function audioPlayground(box, row) {
  const file = el("input", { type: "file", id: "audio-file", accept: "audio/*" });
  const run = el("button", { type: "button", class: "primary", id: "audio-run" }, "Transcribe");
  const out = el("pre", { id: "audio-output" });
  box.append(el("div", { class: "field" }, el("label", { for: file.id }, "Audio file"), file), run, out);
  run.addEventListener("click", async () => {
    if (!file.files.length) return;
    const form = new FormData();
    form.append("model", row.name);
    form.append("file", file.files[0]);
    try { out.textContent = pretty(await (await api("/v1/audio/transcriptions", { body: form })).json()); }
    catch (error) { out.textContent = error.message; }
  });
}

function speechPlayground(box, row) {
  const input = el("textarea", { id: "speech-input", rows: 2 }, "Hello from ModelDock.");
  const run = el("button", { type: "button", class: "primary", id: "speech-run" }, "Speak");
  const out = el("div", { id: "speech-output" });
  box.append(el("div", { class: "field" }, el("label", { for: input.id }, "Text"), input), run, out);
  run.addEventListener("click", async () => {
    out.replaceChildren(el("span", { class: "muted" }, "speaking…"));
    try {
      const audio = await (await api("/v1/audio/speech", { json: { model: row.name, input: input.value, response_format: "wav" } })).blob();
      out.replaceChildren(el("audio", { controls: true, src: URL.createObjectURL(audio) }));
    } catch (error) { out.replaceChildren(el("span", { class: "error" }, error.message)); }
  });
}

function imagePlayground(box, row) {
  const prompt = el("input", { type: "text", id: "image-prompt", value: "a lighthouse at dusk", style: "width:100%" });
  const run = el("button", { type: "button", class: "primary", id: "image-run" }, "Generate");
  const out = el("div", { id: "image-output" });
  box.append(el("div", { class: "field" }, el("label", { for: prompt.id }, "Prompt"), prompt), run, out);
  run.addEventListener("click", async () => {
    out.replaceChildren(el("span", { class: "muted" }, "generating…"));
    try {
      const data = await (await api("/v1/images/generations", { json: { model: row.name, prompt: prompt.value, n: 1, response_format: "b64_json" } })).json();
      out.replaceChildren(el("img", { class: "generated", src: "data:image/png;base64," + data.data[0].b64_json, alt: prompt.value }));
    } catch (error) { out.replaceChildren(el("span", { class: "error" }, error.message)); }
  });
}

// A form built from the model's metadata: one shape and one data box per input, sent as KServe v2 JSON.
function tensorPlayground(box, row, metadata) {
  const fields = metadata.inputs.map((input) => {
    const shape = input.shape.map((d) => (d < 0 ? 1 : d));
    const shapeBox = el("input", { type: "text", "data-input": input.name, "data-role": "shape", value: shape.join(","), style: "width:8em" });
    const dataBox = el("textarea", { "data-input": input.name, "data-role": "data", rows: 2 }, JSON.stringify(sampleData(input.datatype, shape)));
    shapeBox.addEventListener("change", () => {
      dataBox.value = JSON.stringify(sampleData(input.datatype, parseShape(shapeBox.value)));
    });
    box.append(el("div", { class: "field" },
      el("label", {}, `${input.name} · ${input.datatype} · shape `, shapeBox), dataBox));
    return { input, shapeBox, dataBox };
  });
  const run = el("button", { type: "button", class: "primary", id: "infer-run" }, "Infer");
  const out = el("div", { id: "infer-output" });
  box.append(run, out);
  run.addEventListener("click", async () => {
    out.replaceChildren(el("span", { class: "muted" }, "running…"));
    try {
      const inputs = fields.map(({ input, shapeBox, dataBox }) => ({
        name: input.name, datatype: input.datatype, shape: parseShape(shapeBox.value), data: JSON.parse(dataBox.value).flat(Infinity),
      }));
      const started = performance.now();
      const data = await (await api(`/v2/models/${row.name}/versions/${row.version}/infer`, { json: { inputs } })).json();
      const ms = performance.now() - started;
      const table = el("table", { id: "infer-outputs" }, el("thead", {}, el("tr", {}, el("th", {}, "Output"), el("th", {}, "Type"), el("th", {}, "Shape"), el("th", {}, "Data"))));
      const body = el("tbody");
      for (const output of data.outputs) {
        const values = output.data.map((v) => (typeof v === "number" && !Number.isInteger(v) ? Number(v.toFixed(5)) : v));
        body.append(el("tr", { "data-output": output.name }, el("td", {}, output.name), el("td", {}, output.datatype),
          el("td", {}, `[${output.shape.join(", ")}]`), el("td", { class: "values" }, JSON.stringify(values))));
      }
      table.append(body);
      out.replaceChildren(el("p", { class: "muted" }, `answered in ${ms.toFixed(1)} ms`), table);
    } catch (error) {
      out.replaceChildren(el("p", { class: "error" }, error.message));
    }
  });
}

function parseShape(text) { return text.split(",").map((d) => parseInt(d.trim(), 10)).filter((d) => !Number.isNaN(d)); }

function sampleData(datatype, shape) {
  const count = shape.reduce((a, b) => a * b, 1);
  const values = [];
  for (let i = 0; i < count; i++) {
    if (datatype === "BYTES") values.push("hello");
    else if (datatype === "BOOL") values.push(false);
    else if (datatype.startsWith("FP")) values.push(Number(((i % 10) / 10).toFixed(1)));
    else values.push(i % 10);
  }
  return values;
}

// -- start ---------------------------------------------------------------------------------------------------
async function start() {
  state.settings = await (await fetch("settings.json")).json();
  loadCredentials();
  document.getElementById("credentials-button").addEventListener("click", openCredentials);
  document.getElementById("credentials-form").addEventListener("submit", saveCredentials);
  for (const button of document.querySelectorAll(".tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  renderAccess();
  try {
    const server = await (await api("/v2")).json();
    document.getElementById("server-info").textContent = `${server.name} ${server.version} · ${state.settings.model_control_mode} mode`;
  } catch (error) {
    document.getElementById("server-info").textContent = error.message;
  }
  await refresh();
  document.body.dataset.ready = "true";
  setInterval(refresh, POLL_MS);
}

start();
