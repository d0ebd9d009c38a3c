// The search page: choose or drop an image, POST it to /search, show the ranked results.
"use strict";

const statusLine = document.getElementById("status");
const drop = document.getElementById("drop");
const fileInput = document.getElementById("file");
const preview = document.getElementById("preview");
const dropText = document.getElementById("drop-text");
const kInput = document.getElementById("k");
const errorLine = document.getElementById("error");
const summary = document.getElementById("summary");
const results = document.getElementById("results");
const template = document.getElementById("result-template");

let maxUpload = Infinity;
let lastFile = null;

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

async function loadHealth() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    maxUpload = health.max_upload_bytes;
    kInput.max = health.max_k;
    kInput.value = Math.min(Number(kInput.value), health.max_k) || health.default_k;
    const model = health.model ? `model ${health.model}` : "no model: embedding queries only";
    statusLine.textContent = `${health.count.toLocaleString()} items · ${health.type} index · ${health.dims} dimensions · ${model}`;
    if (!health.image_search) {
      drop.classList.add("disabled");
      dropText.textContent = "This server was started without a model: image search is off";
    }
  } catch (error) {
    statusLine.textContent = "The server does not answer.";
  }
}

function thumbnailOf(hit) {
  if (hit.thumbnail) return hit.thumbnail;
  if (typeof hit.url === "string" && /^https?:\/\//.test(hit.url)) return hit.url;
  return null;
}

function render(data, elapsed) {
  results.replaceChildren();
  summary.textContent = `${data.results.length} results in ${elapsed.toFixed(0)} ms`;
  for (const hit of data.results) {
    const item = template.content.firstElementChild.cloneNode(true);
    const image = item.querySelector("img");
    const source = thumbnailOf(hit);
    const label = hit.key ?? String(hit.id);
    if (source) {
      image.src = source;
      image.alt = hit.caption || label;
      image.addEventListener("error", () => { image.replaceWith(document.createTextNode("no preview")); });
    } else {
      image.replaceWith(document.createTextNode("no preview"));
    }
    item.querySelector(".rank").textContent = `#${hit.rank}`;
    item.querySelector(".score").textContent = hit.score.toFixed(3);
    item.querySelector(".caption").textContent = hit.caption || "";
    item.querySelector(".key").textContent = label;
    item.dataset.id = hit.id;
    results.appendChild(item);
  }
}

async function search(file) {
  if (!file) return;
  lastFile = file;
  showError("");
  if (file.size > maxUpload) {
    showError(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(maxUpload / 1e6).toFixed(1)} MB.`);
    return;
  }
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  summary.textContent = "Searching…";
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", kInput.value);
  const start = performance.now();
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) {
      summary.textContent = "";
      results.replaceChildren();
      showError(data.detail || `The server answered ${response.status}.`);
      return;
    }
    render(data, performance.now() - start);
  } catch (error) {
    summary.textContent = "";
    showError(`The search failed: ${error.message}`);
  }
}

fileInput.addEventListener("change", () => search(fileInput.files[0]));
kInput.addEventListener("change", () => search(lastFile));
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
  if (file) search(file);
});
// Dropping an image anywhere else must not navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

loadHealth();
