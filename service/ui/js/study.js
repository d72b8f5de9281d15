// A study: its runs, and Tables 1-3 over seeds from GET /studies/{id}/results as soon as any run has results.
// Each cell is the mean with its spread: ± one sample standard deviation for a summary over seeds, the 95 % t
// interval [low, high] for a paired difference; the small bar draws the same range (igat_core/study_results.py).

import { get, post } from "./api.js";
import { errorBar } from "./charts.js";
import { TERMINAL, badge, bar, h, number, problem, replace } from "./dom.js";
import { ATTACKS, MODELS } from "./results.js";

const POLL_MS = 3000;

const column = (row) => `${row.combiner} ${ATTACKS[row.attack] || row.attack}`;

// Where a row's range lies: the interval of a paired difference, else mean ± std.
function range(row) {
  if (row.low !== undefined) return [row.low, row.high];
  if (typeof row.mean === "number" && typeof row.std === "number") return [row.mean - row.std, row.mean + row.std];
  return [row.mean, row.mean];
}

// The cell's first line: mean ± std, or mean ± half the interval of a paired difference.
function spreadText(row, signed) {
  const mean = number(row.mean, { signed });
  if (row.low !== undefined) return typeof row.low === "number" ? `${mean} ± ${number((row.high - row.low) / 2)}` : mean;
  return typeof row.std === "number" ? `${mean} ± ${number(row.std)}` : mean;
}

function intervalText(row) {
  if (row.low === undefined) return null;
  if (typeof row.low !== "number") return `no interval: ${row.note || "too few pairs"}`;
  return `[${number(row.low, { signed: true })}, ${number(row.high, { signed: true })}]`;
}

function excluded(row) {
  const parts = ["failed", "pending"].filter((k) => row[k]).map((k) => `${row[k]} ${k}`);
  if (row.missing_runs?.length) parts.push(`${row.missing_runs.length} missing`);
  return `n=${row.n}${parts.length ? `; ${parts.join(", ")}` : ""}`;
}

function cell(row, scale, signed) {
  const [low, high] = range(row);
  return h("td", { class: row.failed || row.pending ? "partial" : null, "data-column": column(row),
    "data-mean": row.mean, "data-std": row.std, "data-low": row.low, "data-high": row.high, "data-n": row.n },
  h("span", { class: "spread" }, spreadText(row, signed)), " ", errorBar(row.mean, low, high, scale), h("br"),
  intervalText(row) ? [h("span", { class: "interval" }, intervalText(row)), " "] : null,
  h("span", { class: "muted" }, `(${excluded(row)})`));
}

// The range a column's bars share: its rows' ranges, padded a little, with zero in it for differences.
function scaleOf(rows, signed) {
  const values = rows.flatMap((r) => [r.mean, ...range(r)]).filter(Number.isFinite);
  if (signed) values.push(0);
  if (!values.length) return [0, 1];
  const [low, high] = [Math.min(...values), Math.max(...values)];
  const pad = (high - low) * 0.1 || 1;
  return [low - pad, high + pad];
}

// One line per distinct `keys` of the rows (a key empty in every row left out), one column per combiner x attack.
export function pivot(id, rows, keys, { signed = false } = {}) {
  const shownKeys = keys.filter((k) => rows.some((r) => r[k] !== "" && r[k] !== null && r[k] !== undefined));
  const columns = [...new Set(rows.map(column))];
  const lines = new Map();
  for (const row of rows) {
    const label = shownKeys.map((k) => row[k]).join("\u0000");
    if (!lines.has(label)) lines.set(label, { labels: shownKeys.map((k) => row[k]), cells: new Map() });
    lines.get(label).cells.set(column(row), row);
  }
  const scales = new Map(columns.map((c) => [c, scaleOf(rows.filter((r) => column(r) === c), signed)]));
  const body = [...lines.values()].map((line) => h("tr", { "data-row": line.labels.join(" / ") },
    line.labels.map((l) => h("th", {}, l)),
    columns.map((c) => (line.cells.has(c) ? cell(line.cells.get(c), scales.get(c), signed) : h("td")))));
  return h("div", { class: "scroll" }, h("table", { id, class: "numbers study" },
    h("thead", {}, h("tr", {}, shownKeys.map((k) => h("th", {}, k)), columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, body)));
}

function tables(record) {
  const parts = [];
  if (record.table1?.length) {
    parts.push(h("h2", {}, "Table 1: accuracy (%) over seeds, mean ± sample std"),
      pivot("study-table1", record.table1.map((r) => ({ ...r, model: MODELS[r.model] || r.model })),
        ["setting", "method", "model"]));
  }
  if (record.table2?.relative_improvement?.length) {
    parts.push(h("h2", {}, "Table 2: relative improvement by iGAT over the base (%), mean ± std"),
      pivot("study-table2", record.table2.relative_improvement, ["setting", "method"], { signed: true }));
  }
  if (record.table2?.paired?.length) {
    parts.push(h("h3", {}, "Paired differences in accuracy points, mean ± half-width [95 % t interval]"),
      pivot("study-table2-paired", record.table2.paired, ["setting", "method", "comparison"], { signed: true }));
  }
  if (record.table3?.length) parts.push(...table3(record));
  return parts;
}

function table3(record) {
  const differences = record.table3.filter((r) => r.difference).map((r) => ({ ...r.difference, setting: r.setting,
    arm: r.arm, combiner: r.combiner, attack: r.attack }));
  return [h("h2", {}, "Table 3: ablation arms, iGAT model, accuracy (%) over seeds"),
    pivot("study-table3", record.table3, ["setting", "arm"]),
    differences.length ? [h("h3", {}, `Paired difference arm − ${record.reference_arm}, accuracy points, mean ± `
      + "half-width [95 % t interval]"), pivot("study-table3-paired", differences, ["setting", "arm"],
      { signed: true })] : null];
}

function runsTable(study) {
  return h("table", { id: "study-runs" }, h("thead", {}, h("tr", {}, ["run", "arm", "variant", "point", "status",
    "base of", "error"].map((c) => h("th", {}, c)))), h("tbody", {}, study.experiments.map((r) => h("tr",
    { "data-id": r.id, "data-status": r.status }, h("td", {}, h("a", { href: `#/experiments/${r.id}` }, r.name)),
    h("td", {}, r.arm), h("td", {}, r.variant || ""), h("td", {}, JSON.stringify(r.point)), h("td", {}, badge(r.status)),
    h("td", {}, r.base_of || ""), h("td", { class: "error" }, r.error || "")))));
}

function summary(study, record, onCancel) {
  const c = record.counts;
  return [h("h1", {}, `Study ${study.name} `, badge(study.status)),
    study.spec?.description ? h("p", {}, study.spec.description) : null,
    h("p", { id: "study-progress" }, bar(study.progress), ` ${c.succeeded} succeeded, ${c.failed} failed, `
      + `${c.pending} pending of ${c.planned} runs · reference arm ${record.reference_arm}`),
    TERMINAL.has(study.status) ? null : h("p", { class: "actions" },
      h("button", { id: "cancel", type: "button", onclick: onCancel }, "Cancel the study"), h("span", { id: "cancel-note" }))];
}

export function studyPage(root, id) {
  const top = h("div");
  const body = h("div");
  const page = h("div", { id: "study", "data-id": id }, top, body);
  let timer = null;
  let stopped = false;

  const cancel = async () => {
    clearTimeout(timer);
    try {
      await post(`/studies/${id}/cancel`);
      await load();
    } catch (error) {
      replace(root.querySelector("#cancel-note"), problem(error));
    }
  };
  const load = async () => {
    const [study, record] = await Promise.all([get(`/studies/${id}`), get(`/studies/${id}/results`)]);
    replace(top, summary(study, record, cancel));
    replace(body, tables(record), h("h2", {}, "Runs"), runsTable(study));
    page.dataset.status = study.status;
    if (!TERMINAL.has(study.status) && !stopped) timer = setTimeout(() => load().catch(show), POLL_MS);
  };
  const show = (error) => replace(top, problem(error));

  replace(root, page);
  load().catch(show);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
