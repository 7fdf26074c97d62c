"use strict";
// The page of `cxr serve`: everything through the app's own API, no external assets.
// Every value from the server or a file name is set with textContent, never as HTML.

const state = { token: sessionStorage.getItem("cxr-token") || "", rows: [], card: null };

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (Array.isArray(value)) return "[" + value.map(fmt).join(", ") + "]";
  if (typeof value === "object") return Object.entries(value).map(([k, v]) => k + ": " + fmt(v)).join("; ");
  return String(value);
}

async function loadCard() {
  const response = await fetch("/v1/model", { headers: authHeaders() });
  if (response.status === 401) {
    document.getElementById("auth").hidden = false;
    setStatus("This server needs a bearer token.");
    return;
  }
  const card = await response.json();
  state.card = card;
  const dl = document.getElementById("card");
  dl.replaceChildren();
  const metrics = card.test_metrics || {};
  const rows = [
    ["Model", card.identity],
    ["Network", card.network], ["Variant", card.variant], ["Input size", card.input_size],
    ["Initialisation", card.init],
    ["Threshold", card.threshold && (fmt(card.threshold.value) + " (" + fmt(card.threshold.rule) + ", on " +
      fmt(card.threshold.split) + ")")],
    ["Calibration", card.calibration],
    ["Selection", card.selection],
    ["Training counts", card.training_counts],
    ["Out-of-distribution gate", card.out_of_distribution_gate || "none (this model has no gate)"],
    ["Test ROC AUC", metrics.roc_auc !== undefined ? fmt(metrics.roc_auc) + " (95% CI " + fmt(metrics.roc_auc_ci95) + ")" : null],
    ["Test sensitivity", metrics.sensitivity],
    ["Test specificity", metrics.specificity],
    ["Note", card.note],
  ];
  for (const [name, value] of rows) {
    if (value === null || value === undefined) continue;
    dl.append(el("dt", { textContent: name }), el("dd", { textContent: fmt(value) }));
  }
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

async function screen(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const heatmaps = document.getElementById("heatmaps").checked;
  setStatus("Screening " + files.length + " image(s)...");
  let response;
  try {
    response = await fetch("/v1/screen?heatmaps=" + heatmaps, { method: "POST", body: form, headers: authHeaders() });
  } catch (err) {
    setStatus("The server could not be reached: " + err);
    return;
  }
  const body = await response.json().catch(() => ({ error: "the server answered " + response.status }));
  if (!response.ok) {
    setStatus("Refused (" + response.status + "): " + body.error);
    if (response.status === 401) document.getElementById("auth").hidden = false;
    return;
  }
  setStatus("");
  for (const result of body.results) {
    state.rows.push({ result, model: body.model, engine: body.engine });
    show(result);
  }
  document.getElementById("results-section").hidden = false;
}

function show(result) {
  const box = el("article", { className: "result" });
  box.append(el("div", { className: "name", textContent: result.filename }));
  if (result.input_png) {
    const img = el("img", { alt: "preprocessed input of " + result.filename, src: "data:image/png;base64," + result.heatmap_png });
    img.dataset.view = "heatmap";
    const toggle = el("button", { type: "button", textContent: "Show preprocessed image" });
    toggle.addEventListener("click", () => {
      const heat = img.dataset.view !== "heatmap";
      img.dataset.view = heat ? "heatmap" : "input";
      img.src = "data:image/png;base64," + (heat ? result.heatmap_png : result.input_png);
      toggle.textContent = heat ? "Show preprocessed image" : "Show heatmap";
    });
    box.append(img, toggle);
  }
  if (result.out_of_distribution) {
    box.append(el("div", { className: "ood", textContent: "Out of distribution: this image is unlike the " +
      "radiographs the model was trained on (score " + fmt(result.ood_score) + ", threshold " +
      fmt(state.card && state.card.out_of_distribution_gate && state.card.out_of_distribution_gate.threshold) +
      "). Its probability is shown, but no decision is taken." }));
  }
  if (result.error) {
    box.append(el("div", { className: "error", textContent: "Not screened: " + result.error }));
  } else {
    box.append(el("div", { className: "prob", textContent: "P(COVID-19) = " + result.probability.toFixed(3) }));
    const decision = result.decision || "withheld (out of distribution)";
    box.append(el("div", {}, "Decision: ", el("span", { className: "decision decision-" +
      (result.decision || "withheld").replace(/[^A-Za-z0-9-]/g, ""), textContent: decision }),
      " (threshold " + fmt(result.threshold) + ")"));
  }
  document.getElementById("results").append(box);
}

// A cell a spreadsheet would run as a formula (=, +, -, @, tab, CR) is prefixed with a quote.
function csvCell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function downloadCsv() {
  const columns = state.card && state.card.csv_columns;
  if (!columns) return;
  const lines = [columns.join(",")];
  for (const { result, model, engine } of state.rows) {
    const decided = !result.error;
    const values = {
      path: result.filename, decision: decided && result.decision ? result.decision : "", threshold: result.threshold,
      out_of_distribution: result.out_of_distribution === null || result.out_of_distribution === undefined
        ? "" : String(result.out_of_distribution),
      ood_score: result.ood_score === null || result.ood_score === undefined ? "" : result.ood_score,
      model: model, engine: decided ? engine : "", error: result.error || "",
    };
    values[columns[1]] = decided ? result.probability : "";
    lines.push(columns.map((c) => csvCell(values[c])).join(","));
  }
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const link = el("a", { href: url, download: "predictions.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(url);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => { screen([...input.files]); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); screen([...e.dataTransfer.files]); });
  document.getElementById("csv").addEventListener("click", downloadCsv);
  document.getElementById("token-save").addEventListener("click", () => {
    state.token = document.getElementById("token").value.trim();
    sessionStorage.setItem("cxr-token", state.token);
    document.getElementById("auth").hidden = true;
    setStatus("");
    loadCard();
  });
  loadCard();
});
