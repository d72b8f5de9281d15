// An experiment's results.json as the paper lays it out: the sanity checks first, Table 1 (accuracy of every model
// under both combiners and every attack), Table 2 (iGAT's relative improvement over the base and over each
// control) and the gains in points, the supplement's diagnostics, the plots and the files to download.
// Names and order follow igat_core/report.py.

import { fileUrl } from "./api.js";
import { h, number, seconds } from "./dom.js";

export const MODELS = { base: "base", baseline: "baseline", continued: "continued", global_at: "global_at", igat: "iGAT",
  model: "model" };
export const ATTACKS = { natural: "Natural", pgd: "PGD", cw: "CW", signhunter: "SH", autoattack: "AA", mim: "MIM",
  simba: "SimBA", bandits: "Bandits", mora: "MORA", logit_pgd: "Logit-PGD", transfer: "Transfer",
  union_standard: "Union w/o ens.-aware", union: "Union" };
const COMBINERS = ["average", "max"];
const DIAGNOSTICS = [
  ["p: members correct on global adversarial examples (Table 4)", "p", true],
  ["expected largest wrong-class score (Table 6)", "largest_wrong_score", false],
  ["h_y ≥ (1 − h_ŷ) / (C − 1) when a member errs (Table 7)", "small_wrong_score_rate", true],
  ["best member's true-class score on ensemble errors (Table 8)", "best_member_score_on_errors", false],
  ["ensemble accuracy on them", "adversarial_accuracy", true],
];

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const title = (names, key) => names[key] || key;

function ordered(known, found) {
  const seen = new Set(found);
  return [...Object.keys(known).filter((k) => seen.has(k)), ...[...seen].filter((k) => !(k in known))];
}

// Columns: each combiner, then each attack any row has under it; rows: {key, label, values[combiner][attack]}.
function grid(id, corner, rows, { signed = false, rowKey }) {
  const combiners = COMBINERS.filter((c) => rows.some((r) => isObject(r.values[c])));
  const attacks = ordered(ATTACKS, rows.flatMap((r) => combiners.flatMap((c) => Object.keys(r.values[c] || {}))));
  const head = h("thead", {},
    h("tr", {}, h("th", { rowspan: 2 }, corner),
      combiners.map((c) => h("th", { colspan: attacks.length, class: "group" }, c))),
    h("tr", {}, combiners.map(() => attacks.map((a) => h("th", {}, title(ATTACKS, a))))));
  const body = h("tbody", {}, rows.map((r) => h("tr", { [`data-${rowKey}`]: r.key }, h("th", {}, r.label),
    combiners.map((c) => attacks.map((a) => cell(r.values[c]?.[a], c, a, signed))))));
  return h("table", { id, class: "numbers" }, head, body);
}

function cell(value, combiner, attack, signed) {
  const known = value !== undefined && value !== null;
  return h("td", { "data-combiner": combiner, "data-attack": attack, "data-value": known ? value : null,
    class: typeof value === "number" ? null : "missing" }, known ? number(value, { signed }) : "");
}

function accuracyTable(evaluation) {
  const models = ordered(MODELS, Object.keys(evaluation).filter((m) => isObject(evaluation[m]) && m !== "eps_sweep"));
  const rows = models.map((m) => ({ key: m, label: title(MODELS, m), values: evaluation[m] }));
  return grid("table1", "model", rows, { rowKey: "model" });
}

function comparisonTable(id, over, target, joiner) {
  const rows = Object.entries(over).map(([m, values]) => ({ key: m, label: `${target} ${joiner} ${title(MODELS, m)}`,
    values }));
  return grid(id, "", rows, { signed: true, rowKey: "reference" });
}

function target(results) {
  const references = results.improvement_over || {};
  const models = Object.keys(results.evaluation).filter((m) => isObject(results.evaluation[m]));
  return title(MODELS, models.find((m) => !(m in references) && m !== "eps_sweep") || "igat");
}

export function sanitySection(sanity) {
  const all = Object.entries(sanity || {});
  const failed = all.filter(([, c]) => !c.passed);
  const passed = all.filter(([, c]) => c.passed);
  const summary = failed.length
    ? h("p", { class: "fail", id: "sanity-summary" }, `${failed.length} of ${all.length} sanity checks FAILED: `
      + "the numbers below are shown unchanged; read them with the failed checks in mind.")
    : h("p", { class: "pass", id: "sanity-summary" }, `All ${all.length} sanity checks passed.`);
  const rows = (checks) => h("table", { class: "checks" }, h("tbody", {}, checks.map(([name, c]) => h("tr",
    { class: c.passed ? "pass" : "fail", "data-check": name }, h("td", {}, c.passed ? "PASS" : "FAIL"),
    h("td", {}, h("code", {}, name)), h("td", {}, c.detail || "")))));
  return h("section", { id: "sanity" }, h("h2", {}, "Sanity checks"), summary,
    failed.length ? rows(failed) : null,
    passed.length ? h("details", { open: !failed.length }, h("summary", {}, `${passed.length} passed`), rows(passed))
      : null,
    all.length ? null : h("p", {}, "(none ran)"));
}

function diagnosticsTable(diagnostics) {
  const models = Object.keys(diagnostics).filter((m) => isObject(diagnostics[m]));
  if (!models.length) return null;
  const value = (v, percent) => (typeof v === "number" ? (percent ? `${v.toFixed(2)}%` : v.toFixed(3)) : "n/a");
  const rows = DIAGNOSTICS.map(([label, key, percent]) => [label, models.map((m) => value(diagnostics[m][key], percent))]);
  const histogram = diagnostics[models[0]].correct_score_histogram;
  (histogram?.labels || []).forEach((bin, k) => rows.push([`true-class score ${bin} when correct (Table 5)`,
    models.map((m) => value(diagnostics[m].correct_score_histogram?.percent?.[k], true))]));
  if (models.every((m) => diagnostics[m].curvature)) {
    rows.push(["member curvature λ, median / max (eq. 2)", models.map((m) => {
      const c = diagnostics[m].curvature.members;
      return `${value(c.median)} / ${value(c.max)}`;
    })]);
  }
  const first = diagnostics[models[0]];
  return h("section", { id: "diagnostics" },
    h("h2", {}, "Diagnostics on global adversarial examples (supplement Tables 4-8)"),
    h("p", {}, `${first.n_examples} examples, PGD-${first.attack?.steps} on the ${first.combiner} combiner at eps `
      + `${number(first.attack?.eps, { digits: 5 })}.`),
    h("table", { class: "numbers" }, h("thead", {}, h("tr", {}, h("th", {}, "quantity"),
      models.map((m) => h("th", {}, title(MODELS, m))))),
    h("tbody", {}, rows.map(([label, cells]) => h("tr", {}, h("th", {}, label), cells.map((c) => h("td", {}, c)))))));
}

function tablesSection(results) {
  const evaluation = results.evaluation;
  const over = results.improvement_over || (results.improvement ? { base: results.improvement } : {});
  const name = target(results);
  return h("section", { id: "tables" },
    h("p", {}, `Accuracy (%) on ${evaluation.n_examples} test examples, L-inf eps = `
      + `${number(evaluation.eps, { digits: 5 })} (${+(evaluation.eps * 255).toFixed(3)}/255).`),
    h("h2", {}, "Table 1: accuracy (%)"), accuracyTable(evaluation),
    Object.keys(over).length ? [h("h2", {}, "Table 2: relative improvement (%), over the base and the controls"),
      comparisonTable("table2", over, name, "vs")] : null,
    results.gain_points ? [h("h2", {}, "Gain in accuracy points"),
      comparisonTable("gains", results.gain_points, name, "−")] : null);
}

function runSection(results) {
  const timing = Object.entries(results.timing || {});
  const chosen = results.tune?.chosen;
  return h("section", { id: "run" }, h("h2", {}, "Run"),
    h("ul", {}, timing.map(([phase, s]) => h("li", {}, `${phase}: ${seconds(s)}`)),
      chosen ? h("li", {}, `tune chose alpha = ${chosen.alpha}, beta = ${chosen.beta}`) : null,
      results.device ? h("li", {}, `device ${results.device}, torch ${results.torch || ""}`) : null));
}

function downloads(experimentId, artifacts) {
  const wanted = artifacts.filter((a) => a.path.endsWith(".pt") || /^(results\.json|report\.md|spec\.yaml)$/.test(a.path)
    || a.path.endsWith(".log"));
  return h("section", { id: "downloads" }, h("h2", {}, "Downloads"),
    h("ul", {}, wanted.map((a) => h("li", {}, download(a), ` (${size(a.size)})`))));
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  return bytes < 1 << 20 ? `${(bytes / 1024).toFixed(1)} KiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

function download(artifact) {
  const name = artifact.path.split("/").pop();
  const saveAs = artifact.path.replaceAll("/", "_");
  return h("a", { href: artifact.url, download: saveAs, "data-artifact": artifact.path, onclick: async (event) => {
    if (event.currentTarget.dataset.fetched) return;
    event.preventDefault();
    const link = event.currentTarget;
    link.href = await fileUrl(artifact.url);
    link.dataset.fetched = "1";
    link.click();
  } }, artifact.path === name ? name : artifact.path);
}

function plots(artifacts) {
  const images = artifacts.filter((a) => a.path.startsWith("plots/") && /\.(png|svg)$/.test(a.path));
  if (!images.length) return null;
  return h("section", { id: "plots" }, h("h2", {}, "Plots"), images.map((a) => {
    const img = h("img", { alt: a.path, "data-artifact": a.path });
    fileUrl(a.url).then((url) => { img.src = url; }, () => { img.alt = `${a.path} (could not be loaded)`; });
    return h("figure", {}, img, h("figcaption", {}, a.path));
  }));
}

export function renderResults(experimentId, results, artifacts) {
  return h("div", { id: "results" }, sanitySection(results.sanity), tablesSection(results),
    results.diagnostics ? diagnosticsTable(results.diagnostics) : null, plots(artifacts), runSection(results),
    downloads(experimentId, artifacts));
}
