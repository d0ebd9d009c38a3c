// The search page: a text, an image (chosen, dropped, pasted, or "more like this" result), or
// both with a text weight; POST /search, show the ranked results.
"use strict";

const $ = (id) => document.getElementById(id);
const statusLine = $("status");
const drop = $("drop");
const fileInput = $("file");
const preview = $("preview");
const dropText = $("drop-text");
const textForm = $("text-form");
const textInput = $("text");
const weightRow = $("weight-row");
const weightInput = $("text-weight");
const weightValue = $("text-weight-value");
const sourceBox = $("source");
const sourceText = $("source-text");
const kInput = $("k");
const dedupInput = $("dedup");
const urlsRow = $("urls-row");
const distinctUrlsInput = $("distinct-urls");
const minScoreInput = $("min-score");
const safeRow = $("safe-row");
const safeInput = $("safe");
const indexRow = $("index-row");
const indexSelect = $("index");
const modalityRow = $("modality-row");
const aestheticRow = $("aesthetic-row");
const aestheticSelect = $("aesthetic");
const aestheticWeightRow = $("aesthetic-weight-row");
const aestheticWeightInput = $("aesthetic-weight");
const modalitySelect = $("modality");
const multilingualRow = $("multilingual-row");
const multilingualInput = $("multilingual");
const MODALITY_NAMES = { image: "Images", text: "Captions" };
const errorLine = $("error");
const summary = $("summary");
const results = $("results");
const template = $("result-template");
const downloadButton = $("download");

let maxUpload = Infinity;
let health = null;
// What the query searches with besides the text: a file, or an indexed item ("more like this").
let source = null; // {kind: "file", file} | {kind: "like", id, label}
// The search in flight: a newer one cancels it, so that a slow answer never replaces a newer one.
let inFlight = null;
// The answer shown, for "Download CSV".
let shown = null;

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

// What went wrong, from an error answer: the server's {"detail": ...}, else its status (a proxy's page,
// a crash answered in plain text).
async function errorOf(response) {
  const text = await response.text();
  let detail = null;
  try {
    detail = JSON.parse(text).detail;
  } catch (error) {
    // not JSON: the status says it
  }
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) return detail.map((problem) => `${(problem.loc || []).join(".")}: ${problem.msg}`).join("; ");
  return `The server answered ${response.status} ${response.statusText}`.trim() + ".";
}

function currentIndex() {
  return health.indices.find((entry) => entry.name === indexSelect.value) || health.indices[0];
}

function describe(entry) {
  const model = entry.model ? `model ${entry.model}` : entry.multilingual
    ? "no image model: multilingual text, embedding and item queries"
    : "no model: embedding and item queries only";
  return `${entry.count.toLocaleString()} items · ${entry.type} index · ${entry.dims} dimensions · ${model}`;
}

function applyIndex() {
  const entry = currentIndex();
  statusLine.textContent = describe(entry);
  // the embeddings this index can search: its images, and its captions where it holds their embeddings
  const modalities = entry.modalities || ["image"];
  const chosen = modalities.includes(modalitySelect.value) ? modalitySelect.value : modalities[0];
  modalitySelect.replaceChildren(...modalities.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = MODALITY_NAMES[name] || name;
    return option;
  }));
  modalitySelect.value = chosen;
  modalityRow.hidden = modalities.length < 2;
  multilingualRow.hidden = !entry.multilingual; // where the index has a multilingual text model
  if (entry.multilingual_model) multilingualRow.title = `Embed the text with ${entry.multilingual_model}: a text in any of the languages it learnt`;
  urlsRow.hidden = !entry.urls; // where its metadata has URLs: on by default, as in clip-retrieval's front end
  textInput.disabled = !entry.text_search;
  textInput.placeholder = entry.text_search ? "Describe what you are looking for" : "Text search is off: " + entry.text_search_reason;
  textInput.title = entry.text_search ? "" : entry.text_search_reason;
  drop.classList.toggle("disabled", !entry.image_search);
  drop.setAttribute("aria-disabled", String(!entry.image_search));
  fileInput.disabled = !entry.image_search;
  dropText.textContent = entry.image_search
    ? "Drop or paste an image here, or click to choose one"
    : "This index has no model: image search is off";
}

async function loadHealth() {
  try {
    const response = await fetch("healthz");
    if (!response.ok) {
      statusLine.textContent = await errorOf(response);
      return;
    }
    health = await response.json();
    maxUpload = health.max_upload_bytes;
    kInput.max = health.max_k;
    kInput.value = health.default_k; // unicom serve -k
    for (const entry of health.indices) {
      const option = document.createElement("option");
      option.value = entry.name;
      option.textContent = entry.name;
      indexSelect.appendChild(option);
    }
    indexRow.hidden = health.indices.length < 2;
    safeRow.hidden = !health.safe_search; // on by default where the server has a safety filter
    aestheticRow.hidden = aestheticWeightRow.hidden = !health.aesthetic; // where it has LAION's aesthetic embeddings
    applyIndex();
  } catch (error) {
    statusLine.textContent = "The server does not answer.";
  }
}

// The server names an item's images by paths from its root ("/thumbnail/3", or "/unicom/thumbnail/3" when
// started with --root-path); the page asks for them relative to itself, so that it works under any proxy prefix.
function itemUrl(route, hit, index) {
  const first = health !== null && index === health.indices[0].name;
  return `${route}/${hit.id}${first ? "" : `?index=${encodeURIComponent(index)}`}`;
}

function thumbnailOf(hit, index) {
  if (hit.thumbnail) return itemUrl("thumbnail", hit, index);
  if (typeof hit.url === "string" && /^https?:\/\//.test(hit.url)) return hit.url;
  return null;
}

function showSource() {
  const text = textInput.value.trim();
  sourceBox.hidden = source === null;
  if (source !== null) {
    sourceText.textContent = source.kind === "file" ? `Image: ${source.file.name}` : `More like ${source.label}`;
  }
  if (source === null || source.kind !== "file") {
    preview.hidden = true;
  }
  weightRow.hidden = !(source !== null && text);
}

// One CSV field: quoted when it holds a comma, a quote or a line break; a text a spreadsheet would
// run as a formula (=, +, -, @ first) starts with an apostrophe. Numbers are written as they are.
function csvCell(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  let text = typeof value === "object" ? JSON.stringify(value) : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The results as CSV: a column for every key any result has, in the order first seen.
function resultsCsv(hits) {
  const columns = [];
  for (const hit of hits) for (const key of Object.keys(hit)) if (!columns.includes(key)) columns.push(key);
  const lines = [columns.map(csvCell).join(",")];
  for (const hit of hits) lines.push(columns.map((column) => csvCell(hit[column])).join(","));
  return lines.join("\r\n") + "\r\n";
}

function render(data, elapsed, minScore) {
  shown = data;
  downloadButton.hidden = data.results.length === 0;
  // a "more like this" button pressed from the keyboard goes with the old results: keep the focus nearby
  const hadFocus = results.contains(document.activeElement);
  results.replaceChildren();
  const floor = minScore === undefined ? "" : ` scoring at least ${minScore}`;
  summary.textContent = `${data.results.length} results${floor} in ${elapsed.toFixed(0)} ms`;
  for (const hit of data.results) {
    const item = template.content.firstElementChild.cloneNode(true);
    const link = item.querySelector(".thumb");
    const image = link.querySelector("img");
    const picture = thumbnailOf(hit, data.index);
    const label = hit.key ?? String(hit.id);
    if (hit.link) {
      link.href = hit.thumbnail ? itemUrl("image", hit, data.index) : hit.link; // the server's image, or a URL
      link.title = "Open the full image";
    } else {
      link.removeAttribute("href");
    }
    if (picture) {
      image.src = picture;
      image.alt = hit.caption || label;
      image.addEventListener("error", () => { image.replaceWith(document.createTextNode("no preview")); });
    } else {
      image.replaceWith(document.createTextNode("no preview"));
    }
    item.querySelector(".rank").textContent = `#${hit.rank}`;
    item.querySelector(".score").textContent = hit.score.toFixed(data.score_digits);
    item.querySelector(".caption").textContent = hit.caption || "";
    item.querySelector(".key").textContent = label;
    item.querySelector(".like").setAttribute("aria-label", `More like ${label}`);
    item.querySelector(".like").addEventListener("click", () => {
      source = { kind: "like", id: hit.id, label };
      showSource();
      search();
    });
    item.dataset.id = hit.id;
    results.appendChild(item);
  }
  if (hadFocus) summary.focus();
}

async function search() {
  const text = textInput.value.trim();
  showError("");
  showSource();
  if (source === null && !text) return;
  const common = { deduplicate: dedupInput.checked, index: indexSelect.value };
  if (kInput.value.trim() !== "") common.k = Number(kInput.value); // empty: the server's default
  if (minScoreInput.value.trim() !== "") common.min_score = Number(minScoreInput.value); // empty: any score
  if (health !== null && health.safe_search && safeInput.checked) common.safe = true;
  if (!modalityRow.hidden) common.modality = modalitySelect.value;
  if (!multilingualRow.hidden && multilingualInput.checked && text) common.multilingual = true;
  if (!urlsRow.hidden && distinctUrlsInput.checked) common.hide_duplicate_urls = true;
  if (health !== null && health.aesthetic && aestheticSelect.value !== "") {
    common.aesthetic_score = Number(aestheticSelect.value);
    if (aestheticWeightInput.value.trim() !== "") common.aesthetic_weight = Number(aestheticWeightInput.value);
  }
  let request;
  if (source !== null && source.kind === "file") {
    if (source.file.size > maxUpload) {
      showError(`${source.file.name} is ${(source.file.size / 1e6).toFixed(1)} MB; the limit is ${(maxUpload / 1e6).toFixed(1)} MB.`);
      return;
    }
    const form = new FormData();
    form.append("image", source.file, source.file.name);
    for (const [key, value] of Object.entries(common)) form.append(key, String(value));
    if (text) {
      form.append("text", text);
      form.append("text_weight", weightInput.value);
    }
    request = { method: "POST", body: form };
  } else {
    const body = { ...common };
    if (text) body.text = text;
    if (source !== null) body.like = source.id;
    if (text && source !== null) body.text_weight = Number(weightInput.value);
    request = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  if (inFlight !== null) inFlight.abort();
  const mine = new AbortController();
  inFlight = mine;
  summary.textContent = "Searching…";
  const start = performance.now();
  try {
    const response = await fetch("search", { ...request, signal: mine.signal });
    if (!response.ok) {
      const message = await errorOf(response);
      if (inFlight !== mine) return;
      summary.textContent = "";
      results.replaceChildren();
      shown = null;
      downloadButton.hidden = true;
      showError(message);
      return;
    }
    const data = await response.json();
    if (inFlight !== mine) return;
    render(data, performance.now() - start, common.min_score);
  } catch (error) {
    if (inFlight !== mine) return; // replaced by a newer search
    summary.textContent = "";
    showError(`The search failed: ${error.message}`);
  } finally {
    if (inFlight === mine) inFlight = null;
  }
}

function chooseFile(file) {
  if (!file) return;
  if (health !== null && !currentIndex().image_search) {
    showError("This index has no model, so it cannot be searched with an image.");
    return;
  }
  source = { kind: "file", file };
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src); // the previous image's copy
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  search();
}

textForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (source === null && !textInput.value.trim()) showError("Type what you are looking for, or choose an image.");
  else search();
});
textInput.addEventListener("input", showSource);
weightInput.addEventListener("input", () => { weightValue.textContent = Number(weightInput.value).toFixed(2); });
weightInput.addEventListener("change", search);
$("clear").addEventListener("click", () => {
  source = null;
  fileInput.value = "";
  showSource();
  if (textInput.value.trim()) search();
});
fileInput.addEventListener("change", () => chooseFile(fileInput.files[0]));
kInput.addEventListener("change", search);
dedupInput.addEventListener("change", search);
distinctUrlsInput.addEventListener("change", search);
minScoreInput.addEventListener("change", search);
downloadButton.addEventListener("click", () => {
  if (shown === null) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([resultsCsv(shown.results)], { type: "text/csv" }));
  link.download = "results.csv";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 0);
});
safeInput.addEventListener("change", search);
modalitySelect.addEventListener("change", search);
multilingualInput.addEventListener("change", () => { if (textInput.value.trim()) search(); });
aestheticSelect.addEventListener("change", search);
aestheticWeightInput.addEventListener("change", search);
indexSelect.addEventListener("change", () => { applyIndex(); source = source && source.kind === "file" ? source : null; search(); });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); fileInput.click(); }
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) chooseFile(file);
  else showError("Only image files can be dropped here: save the picture, then drop or choose the file.");
});
// An image pasted anywhere on the page (a copied picture or screenshot) is the query image;
// pasted text goes where it is pasted.
document.addEventListener("paste", (event) => {
  const file = Array.from(event.clipboardData ? event.clipboardData.files : []).find((item) => item.type.startsWith("image/"));
  if (!file) return;
  event.preventDefault();
  chooseFile(file);
});
// Dropping an image anywhere else must not navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

loadHealth();
