// lesionlab page: upload an image, show the 7 probabilities, the decision and Grad-CAM.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function fmt(x) { return (x === null || x === undefined) ? "n/a" : x.toFixed(3); }

// values: the accepted names; canonical (optional): name -> the model's name, shown beside
function fillSelect(select, values, canonical) {
  for (const v of values) {
    const opt = document.createElement("option");
    const to = canonical ? canonical[v] : v;
    opt.value = v; opt.textContent = (to && to !== v) ? `${v} (= ${to})` : v;
    select.appendChild(opt);
  }
}

async function loadModel() {
  const res = await fetch("/api/model");
  model = await res.json();
  $("model-name").textContent = `Model: ${model.name} (${model.features}, ${model.head})`;
  const t = model.test;
  const ci = t.ci95 ? ` [${fmt(t.ci95[0])}, ${fmt(t.ci95[1])}]` : "";
  let scores = `Internal test: balanced accuracy ${fmt(t.balanced_accuracy)}${ci}, ` +
    `macro AUC ${fmt(t.macro_auc)}, melanoma sensitivity ${fmt(t.mel_sensitivity)} (n=${t.n})`;
  if (model.external) {
    scores += `; external: balanced accuracy ${fmt(model.external.balanced_accuracy)}`;
  }
  $("model-scores").textContent = scores;
  $("disclaimer").textContent = model.disclaimer;
  if (model.uses_metadata) {
    fillSelect($("sex"), model.sexes, model.vocabulary && model.vocabulary.sex);
    fillSelect($("localization"), model.localizations,
               model.vocabulary && model.vocabulary.site);
    $("meta").hidden = false;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
}

function showResult(out) {
  $("error").hidden = true;
  $("top-class").textContent = `${out.prediction} (${out.name})`;
  const rule = model.decision_rules.balanced_accuracy;
  let decision = `Decision under the balanced-accuracy rule (${rule}): ` +
    `${out.prediction}, probability ${fmt(out.probabilities[out.prediction])}.`;
  if (model.decision_rules.melanoma_rule) {  // the model has no mel class
    decision += ` Melanoma rule: ${model.decision_rules.melanoma_rule}.`;
  } else if (out.decisions && out.decisions.melanoma_rule) {
    const t = model.decision_rules.melanoma_threshold;
    decision += ` Melanoma rule (flag when P(mel) >= ${fmt(t)}, chosen on val for ` +
      `sensitivity >= 0.80): ${out.decisions.melanoma_rule}.`;
  }
  const prev = out.prevalence_probabilities;
  if (prev && prev.mel !== undefined) {  // models.calibrate's second output; decides nothing
    decision += ` At the training data's class frequencies (mel ` +
      `${fmt(model.prevalence_map.val_class_frequencies.mel)} of val), P(mel) reads ` +
      `${fmt(prev.mel)}.`;
  }
  $("decision").textContent = decision;
  // grey, transparent or palette images: the model saw less than a colour photo holds
  $("warnings").textContent = (out.warnings || []).map((w) => `Warning: ${w}`).join(" ");
  $("warnings").hidden = !(out.warnings && out.warnings.length);
  const bars = $("bars");
  bars.replaceChildren();
  for (const [code, p] of Object.entries(out.probabilities)) {
    const row = document.createElement("div");
    row.className = "bar" + (code === out.prediction ? " top" : "");
    row.dataset.cls = code;
    row.innerHTML = `<span class="label"></span><div class="track"><div class="fill"></div>` +
      `</div><span class="value"></span>`;
    row.querySelector(".label").textContent = `${code}: ${model.classes[code]}`;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".value").textContent = p.toFixed(3);
    bars.appendChild(row);
  }
  if (out.gradcam_png) {
    $("overlay").src = out.gradcam_png;
    $("overlay-figure").hidden = false;
  } else {
    $("overlay-figure").hidden = true;
  }
  $("result").hidden = false;
}

async function predict(file) {
  $("preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name);
  if (model.uses_metadata) {
    if ($("age").value !== "") form.append("age", $("age").value);
    if ($("sex").value) form.append("sex", $("sex").value);
    if ($("localization").value) form.append("localization", $("localization").value);
  }
  const gradcam = model.has_gradcam ? "?gradcam=true" : "";
  try {
    const res = await fetch("/api/predict" + gradcam, { method: "POST", body: form });
    const out = await res.json();
    if (!res.ok) {
      const detail = typeof out.detail === "string" ? out.detail : JSON.stringify(out.detail);
      showError(`Error ${res.status}: ${detail}`);
      return;
    }
    showResult(out);
  } catch (err) {
    showError(`Request failed: ${err}`);
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) predict(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]);
});
loadModel().catch((err) => showError(`Cannot load the model summary: ${err}`));
