// idforge /ui: the team's jobs and their quality reports, read from the JSON API with the team's
// API key. Every value from the API is set with textContent (job data is user input), never as HTML.
"use strict";

const KEY = "idforge.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const REFRESH_MS = 2000;
const PAGE = 100; // the API's largest page
const STEP = 50; // jobs shown at first, and added by "Show more"
const PLOT_CAPTIONS = {
  "scores_job.png": "Genuine and impostor scores (job model)",
  "scores_evaluator.png": "Genuine and impostor scores (evaluator)",
  "roc.png": "ROC",
  "det.png": "DET",
  "contact_sheet.png": "Contact sheet",
};

const state = { want: STEP, timer: null, selected: null, shownStatus: null, detailSeq: 0 };
const $ = (id) => document.getElementById(id);

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

const DASH = "\u2014";
const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const pct = (x) => (isNum(x) ? (x * 100).toFixed(2) + "%" : DASH);
const deg = (x) => (isNum(x) ? x.toFixed(1) + "\u00b0" : DASH);
const dec = (x) => (isNum(x) ? x.toFixed(3) : DASH);
const int = (x) => (isNum(x) ? String(x) : DASH);

function safeUrl(url) {
  // Presigned URLs are http(s); anything else (javascript:, data:) is not followed.
  try {
    const u = new URL(url, window.location.href);
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
  } catch (e) {
    return null;
  }
}

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(status ? `${detail} (HTTP ${status})` : detail);
    this.status = status;
  }
}

async function api(path) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY), Accept: "application/json" };
  let r;
  try {
    r = await fetch(path, { headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "the API did not answer: " + e.message);
  }
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    body = null;
  }
  if (!r.ok) throw new ApiError(r.status, (body && body.detail) || r.statusText || "request failed");
  return body;
}

// ---- the key ---------------------------------------------------------------------------------

function signedIn(on) {
  $("key-form").hidden = on;
  $("forget").hidden = !on;
  $("jobs").hidden = !on;
  if (!on) {
    $("detail").hidden = true;
    $("job-rows").replaceChildren();
    clearTimeout(state.timer);
    state.selected = null;
  }
}

function forget(message) {
  sessionStorage.removeItem(KEY);
  signedIn(false);
  showMessage(message);
  $("key").value = "";
  $("key").focus();
}

// ---- the job list ----------------------------------------------------------------------------

async function loadJobs() {
  const jobs = [];
  let after = null;
  let more = false;
  do {
    const q = new URLSearchParams({ limit: String(Math.min(PAGE, state.want - jobs.length)) });
    if (after) q.set("after", after);
    const page = await api("v1/jobs?" + q);
    jobs.push(...page.jobs);
    more = page.has_more;
    after = page.next;
  } while (more && jobs.length < state.want);
  return { jobs, more };
}

function stageText(job) {
  if (!job.stage) return DASH;
  const s = job.progress.stage || {};
  return s.total > 0 && !TERMINAL.has(job.status) ? `${job.stage} (${s.done}/${s.total} ${s.unit || ""})`.trim()
    : job.stage;
}

function jobRow(job) {
  const tr = el("tr", null, { "data-job-id": job.id, "data-status": job.status });
  if (job.id === state.selected) tr.classList.add("selected");
  const open = el("button", job.id, { type: "button", class: "job-link" });
  open.addEventListener("click", () => select(job.id));
  const idCell = el("td");
  idCell.append(open);
  const created = String(job.created_at || "").replace("T", " ");
  const p = job.progress;
  const progressCell = el("td", null, { class: "progress" });
  progressCell.append(el("progress", null, { max: String(Math.max(p.images_total, 1)), value: String(p.images_done) }),
    el("span", `${p.images_done}/${p.images_total} images`, { class: "progress-text" }));
  const err = job.error ? `${job.error.code}: ${job.error.message}` : "";
  tr.append(idCell, el("td", created, { class: "created" }),
    el("td", job.status, { class: "status status-" + job.status }), el("td", stageText(job), { class: "stage" }),
    progressCell, el("td", err, { class: "error" }));
  return tr;
}

function drawJobs(jobs, more) {
  $("job-rows").replaceChildren(...jobs.map(jobRow));
  $("jobs-note").textContent = jobs.length === 0 ? "No jobs yet."
    : more ? `Showing the newest ${jobs.length} jobs; there are more.` : `${jobs.length} job(s).`;
  $("more").hidden = !more;
}

async function refresh() {
  clearTimeout(state.timer);
  let listed;
  try {
    listed = await loadJobs();
  } catch (e) {
    if (e.status === 401) {
      forget("The API key was refused: " + e.message);
      return;
    }
    showMessage("Could not load the jobs: " + e.message);
    state.timer = setTimeout(refresh, REFRESH_MS * 2);
    return;
  }
  showMessage("");
  signedIn(true);
  drawJobs(listed.jobs, listed.more);
  const sel = listed.jobs.find((j) => j.id === state.selected);
  if (sel && sel.status !== state.shownStatus) loadDetail(sel.id);
  if (listed.jobs.some((j) => !TERMINAL.has(j.status))) state.timer = setTimeout(refresh, REFRESH_MS);
}

// ---- one job ---------------------------------------------------------------------------------

function select(id) {
  state.selected = id;
  for (const tr of $("job-rows").children) tr.classList.toggle("selected", tr.dataset.jobId === id);
  loadDetail(id);
}

async function loadDetail(id) {
  const seq = ++state.detailSeq;
  const body = $("detail-body");
  $("detail").hidden = false;
  $("detail-title").textContent = "Job " + id;
  let job;
  let report = null;
  let reportError = null;
  try {
    job = await api("v1/jobs/" + encodeURIComponent(id));
    if (job.status === "succeeded") {
      try {
        report = (await api("v1/jobs/" + encodeURIComponent(id) + "/artifacts?limit=1")).report;
      } catch (e) {
        reportError = e.message;
      }
    }
  } catch (e) {
    if (seq === state.detailSeq) body.replaceChildren(el("p", "Could not load the job: " + e.message, { class: "error" }));
    return;
  }
  if (seq !== state.detailSeq) return; // another job was selected meanwhile
  state.shownStatus = job.status;
  $("detail-title").textContent = `Job ${job.id}: ${job.status}`;
  body.replaceChildren(...detailParts(job, report, reportError));
}

function detailParts(job, report, reportError) {
  if (job.status === "failed" || job.status === "canceled") {
    const e = job.error;
    return [el("p", e ? `${e.code}: ${e.message}` : `The job was ${job.status}.`, { class: "error", id: "detail-error" })];
  }
  if (job.status !== "succeeded") {
    return [el("p", `The job is ${job.status}; its report appears when it has succeeded.`)];
  }
  const quality = (job.result && job.result.quality) || {};
  const parts = [];
  if (reportError) parts.push(el("p", "Could not load the report's files: " + reportError, { class: "error" }));
  if (!quality.models && !report) {
    const off = job.spec && job.spec.quality && job.spec.quality.report === false;
    parts.push(el("p", off ? "This job has no quality report: it was submitted with quality.report = false."
      : "This job has no quality report.", { id: "no-report" }));
    return parts;
  }
  if (quality.models) parts.push(el("h3", "Verification"), modelTable(quality.models));
  parts.push(el("h3", "Dataset"), datasetList(quality));
  if (report) parts.push(...reportParts(report));
  return parts;
}

const MODEL_ROWS = [
  ["eer", "EER", (m) => pct(m.eer)],
  ["fnmr_1e-3", "FNMR @ FMR 1e-3", (m) => pct((m.fnmr_at_fmr || {})["1e-3"])],
  ["fnmr_1e-4", "FNMR @ FMR 1e-4", (m) => pct((m.fnmr_at_fmr || {})["1e-4"])],
  ["min_centre_angle", "Min centre angle", (m) => deg(m.min_centre_angle_deg)],
  ["close_identities", "Close identities", (m) => int(m.close_identities)],
  ["label_flips", "Label flips", (m) => int(m.label_flips)],
];

function modelTable(models) {
  const cols = [["job", "Job model", models.job], ["evaluator", "Evaluator", models.evaluator]];
  const table = el("table", null, { id: "summary" });
  const head = el("tr");
  head.append(el("th", ""));
  for (const [, label, m] of cols) head.append(el("th", m && m.name ? `${label} (${m.name})` : `${label} (none)`, { class: "num" }));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const [key, label, fmt] of MODEL_ROWS) {
    const tr = el("tr");
    tr.append(el("th", label));
    for (const [model, , m] of cols) tr.append(el("td", m ? fmt(m) : DASH, { class: "num", "data-model": model, "data-metric": key }));
    table.tBodies[0].append(tr);
  }
  return table;
}

function datasetList(q) {
  const dl = el("dl", null, { id: "dataset" });
  const add = (key, label, value) => dl.append(el("dt", label), el("dd", value, { "data-field": key }));
  add("images", "Images", int(q.images));
  add("identities", "Identities", int(q.identities));
  add("alignment_failures", "Alignment failures", int(q.alignment_failures));
  const c = q.counts || {};
  add("counts", "Counts", `requested ${int(c.requested)}, rendered ${int(c.rendered)}, alignment failures ` +
    `${int(c.alignment_failures)}, filtered ${int(c.filtered)}, topped up ${int(c.topped_up)}`);
  const l = q.leakage;
  add("leakage", "Leakage", l ? `${int(l.identities)} identities above cosine ${dec(l.threshold)} to ` +
    `${l.reference} (max cosine ${dec(l.max_cosine)})` : "not checked (no reference set)");
  return dl;
}

function plotOrder(a, b) {
  const known = Object.keys(PLOT_CAPTIONS);
  const ia = known.indexOf(a) < 0 ? known.length : known.indexOf(a);
  const ib = known.indexOf(b) < 0 ? known.length : known.indexOf(b);
  return ia - ib || a.localeCompare(b);
}

function reportParts(report) {
  const parts = [];
  const links = el("p", null, { id: "report-links" });
  const html = safeUrl(report.html);
  const json = safeUrl(report.json);
  if (html) links.append(el("a", "Full report (report.html)", { href: html, target: "_blank", rel: "noopener", id: "report-html" }));
  if (json) links.append(" ", el("a", "report.json", { href: json, target: "_blank", rel: "noopener", id: "report-json" }));
  parts.push(links);
  const plots = el("div", null, { class: "plots", id: "plots" });
  for (const name of Object.keys(report.plots || {}).sort(plotOrder)) {
    const src = safeUrl(report.plots[name]);
    if (!src) continue;
    const caption = PLOT_CAPTIONS[name] || name;
    const fig = el("figure", null, { "data-plot": name });
    fig.append(el("img", null, { src, alt: caption }), el("figcaption", caption));
    plots.append(fig);
  }
  if (plots.children.length) parts.push(el("h3", "Plots"), plots);
  return parts;
}

// ---- start -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    if (!key) {
      showMessage("Enter your team's API key.");
      return;
    }
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    refresh();
  });
  $("forget").addEventListener("click", () => forget(""));
  $("more").addEventListener("click", () => {
    state.want += STEP;
    refresh();
  });
  if (sessionStorage.getItem(KEY)) refresh();
  else signedIn(false);
});
