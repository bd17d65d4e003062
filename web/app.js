// The page: the model's config.json and int8 ONNX file from this page's own folder, ONNX Runtime Web
// (WASM, threaded where the page is cross-origin isolated), and each dropped file answered in turn.
import * as ort from "./ort.wasm.min.mjs";
import { headerSize, imageChecks, looksComplete, softmax, toModelInput } from "./preprocess.js";

const MODEL_DIR = "./model/";
const MAX_BYTES = 20 * 1024 * 1024; // as the Python reader: larger files are refused unread
const MAX_PIXELS = 50_000_000;
const MIN_SIDE = 32;

const status = document.getElementById("status");
const table = document.getElementById("results");
const csvButton = document.getElementById("csv");
// What the page answered, in order; also read by the tests and the benchmark.
const state = { results: [], timings: { modelLoadMs: null, slices: [] }, ready: false };
window.hfTumor = state;

class InputError extends Error {}

async function loadModel() {
  const started = performance.now();
  ort.env.wasm.wasmPaths = new URL("./", import.meta.url).href; // the runtime's files sit beside the page
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const config = await (await fetch(MODEL_DIR + "config.json")).json();
  const labels = config.label_names ?? Object.keys(config.id2label ?? {}).sort((a, b) => a - b).map((i) => config.id2label[i]);
  const session = await ort.InferenceSession.create(MODEL_DIR + "model_quantized.onnx", { executionProviders: ["wasm"] });
  state.timings.modelLoadMs = performance.now() - started;
  state.threads = ort.env.wasm.numThreads;
  return { config, labels, session };
}

async function decode(file) {
  if (file.size === 0) throw new InputError("The file is empty.");
  if (file.size > MAX_BYTES) throw new InputError(`The file is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is 20 MB.`);
  const bytes = new Uint8Array(await file.arrayBuffer());
  const header = headerSize(bytes);
  if (!header) throw new InputError("This file is not a JPEG or PNG image (DICOM and other formats: use the app or `hf-tumor predict`).");
  if (header.width * header.height > MAX_PIXELS) {
    throw new InputError(`The image is ${header.width.toLocaleString()} x ${header.height.toLocaleString()} pixels; the limit is ${MAX_PIXELS.toLocaleString()} pixels.`);
  }
  if (header.bitDepth === 16) {
    // browsers drop the low byte; the Python reader stretches the 16-bit range instead: answers would differ
    throw new InputError("A 16-bit PNG: the browser cannot read it as the model's other readers do; use the app or `hf-tumor predict`.");
  }
  if (!looksComplete(bytes, header.format)) throw new InputError(`This ${header.format} file is truncated or corrupt.`);
  let bitmap;
  try {
    // no colour management and no premultiplied alpha: the pixels as stored, as Pillow reads them
    bitmap = await createImageBitmap(new Blob([bytes]), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new InputError(`This ${header.format} file cannot be decoded (truncated or corrupt).`);
  }
  if (Math.min(bitmap.width, bitmap.height) < MIN_SIDE) {
    throw new InputError(`The image is ${bitmap.width} x ${bitmap.height} pixels; at least ${MIN_SIDE} x ${MIN_SIDE} is needed.`);
  }
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height, { colorSpace: "srgb" });
  return { rgba: data, width: bitmap.width, height: bitmap.height };
}

async function classify(model, file) {
  const { rgba, width, height } = await decode(file);
  const cfg = model.config.pretrained_cfg;
  const { input, pixels, size } = toModelInput(rgba, width, height, cfg);
  const feeds = { pixel_values: new ort.Tensor("float32", input, [1, 3, size, size]) };
  const logits = Array.from((await model.session.run(feeds)).logits.data);
  const { probabilities, energy } = softmax(logits);
  const flags = imageChecks(pixels, size).map((r) => `this does not look like a brain MRI slice: ${r}`);
  if (model.config.ood_energy_threshold != null && energy > model.config.ood_energy_threshold) {
    flags.push("unlike the slices this model was trained on: its energy score is above the 99th percentile of validation slices");
  }
  const top = probabilities.indexOf(Math.max(...probabilities));
  return { label: model.labels[top], probabilities: Object.fromEntries(model.labels.map((l, i) => [l, probabilities[i]])), flags };
}

function addRow(model, result) {
  const row = table.tBodies[0].insertRow();
  const trusted = !result.error && result.flags.length === 0;
  row.insertCell().textContent = result.file;
  row.insertCell().textContent = trusted ? result.label : "";
  for (const label of model.labels) {
    const cell = row.insertCell();
    cell.className = "p";
    cell.textContent = result.error ? "" : result.probabilities[label].toFixed(4);
  }
  const note = row.insertCell();
  note.textContent = result.error ?? result.flags.join("; ");
  note.className = result.error ? "error" : "flag";
}

function csvText(model) {
  const quote = (v) => (/[",\n]/.test(String(v)) ? `"${String(v).replaceAll('"', '""')}"` : String(v));
  const lines = [["file", "label", ...model.labels, "note"].join(",")];
  for (const r of state.results) {
    const trusted = !r.error && r.flags.length === 0;
    lines.push([r.file, trusted ? r.label : "", ...model.labels.map((l) => (r.error ? "" : r.probabilities[l].toFixed(4))),
      r.error ?? r.flags.join("; ")].map(quote).join(","));
  }
  return lines.join("\n") + "\n";
}

async function handle(model, files) {
  let done = 0;
  for (const file of files) {
    const started = performance.now();
    let result;
    try {
      result = { file: file.name, ...(await classify(model, file)) };
    } catch (error) {
      // a bad file gets its reason in the table; the page goes on with the rest
      result = { file: file.name, error: error instanceof InputError ? error.message : `Could not read this file (${error.message}).` };
    }
    state.timings.slices.push(performance.now() - started);
    state.results.push(result);
    addRow(model, result);
    status.textContent = `Classified ${++done} of ${files.length}.`;
  }
  csvButton.disabled = state.results.length === 0;
}

async function main() {
  let model;
  try {
    model = await loadModel();
  } catch (error) {
    status.textContent = `The model could not be loaded (${error.message}).`;
    status.className = "error";
    return;
  }
  document.getElementById("about").textContent = `Classifies one MRI slice as ${model.labels.join(", ")}.`;
  table.tHead.innerHTML = `<tr><th>file</th><th>label</th>${model.labels.map((l) => `<th>${l}</th>`).join("")}<th>note</th></tr>`;
  status.textContent = `Model loaded in ${(state.timings.modelLoadMs / 1000).toFixed(1)} s (${state.threads} thread${state.threads > 1 ? "s" : ""}). Drop slices to classify them.`;
  state.ready = true;
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  let queue = Promise.resolve();
  const enqueue = (files) => {
    const list = Array.from(files); // now: the input's FileList is emptied below
    queue = queue.then(() => handle(model, list));
  };
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { enqueue(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); enqueue(e.dataTransfer.files); });
  csvButton.addEventListener("click", () => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([csvText(model)], { type: "text/csv" }));
    link.download = "predictions.csv";
    link.click();
    URL.revokeObjectURL(link.href);
  });
}

main();
