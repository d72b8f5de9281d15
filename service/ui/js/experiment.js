// One experiment, live: its status, phase and epoch, the progress of training and of the evaluation (one bar per
// model, combiner and attack), per-epoch curves, the event log, cancelling; its results once it has succeeded.

import { get, post, serverEvents } from "./api.js";
import { lineChart } from "./charts.js";
import { TERMINAL, badge, bar, h, number, problem, replace, seconds, when } from "./dom.js";
import { renderResults } from "./results.js";

const LOG_LINES = 40;
const RECONNECT_MS = 2000;
const NOT_CURVES = new Set(["lr", "seconds", "examples_per_s"]);

function fresh() {
  return { experiment: null, events: [], phase: null, epoch: null, training: null, evaluation: new Map(),
    metrics: [], last: 0, ended: false };
}

function absorb(state, event) {
  state.last = event.seq;
  if (event.kind !== "progress") state.events.push(event);  // progress is drawn as bars, not logged
  if (state.events.length > LOG_LINES) state.events.shift();
  const data = event.data || {};
  if (event.kind === "status" && state.experiment && data.status) state.experiment.status = data.status;
  if (event.phase && event.phase !== "run") state.phase = event.phase;
  if (event.kind === "epoch") state.epoch = { phase: event.phase, epoch: data.epoch, ...data };
  if (event.kind === "progress" && event.phase === "evaluate") {
    state.evaluation.set(`${data.model}/${data.combiner}/${data.attack}`, data);
  } else if (event.kind === "progress") {
    state.training = { phase: event.phase, ...data };
  }
}

function header(state, actions) {
  const e = state.experiment;
  return h("section", { id: "summary" },
    h("h1", {}, e.name, " ", badge(e.status)),
    h("p", { class: "muted" }, `experiment ${e.id} · priority ${e.priority} · attempt ${e.attempt}`),
    h("ul", { class: "facts" },
      h("li", {}, `created ${when(e.created_at)}`),
      e.started_at ? h("li", {}, `started ${when(e.started_at)}`) : null,
      e.finished_at ? h("li", {}, `finished ${when(e.finished_at)}`) : null,
      e.study_id ? h("li", {}, "study ", h("a", { href: `#/studies/${e.study_id}` }, e.study_id)) : null,
      e.depends_on ? h("li", {}, "loads the base of ", h("a", { href: `#/experiments/${e.depends_on}` },
        e.depends_on)) : null),
    e.error ? h("p", { class: "error", id: "experiment-error" }, e.error) : null,
    actions);
}

function epochsOf(spec, phase) {
  if (!spec) return null;
  return phase === "pretrain" ? spec.base?.train?.epochs : spec.igat?.train?.epochs;
}

function progressSection(state) {
  const t = state.training;
  const epoch = state.epoch;
  const total = t?.epochs || epochsOf(state.experiment.spec, epoch?.phase);
  const lines = [h("p", { id: "phase" }, "phase: ", h("strong", {}, state.phase || "(not started)"),
    epoch ? h("span", { id: "epoch" }, ` · ${epoch.phase} epoch ${epoch.epoch}${total ? ` of ${total}` : ""}`) : null,
    epoch?.examples_per_s ? ` · ${number(epoch.examples_per_s, { digits: 0 })} examples/s` : null)];
  if (t && t.batches) {
    const label = `${t.phase} epoch ${t.epoch}/${t.epochs}, batch ${t.batch}/${t.batches}`;
    lines.push(h("p", { id: "training-progress" }, bar(t.batch / t.batches, label), ` ${label}`,
      t.eta_s !== undefined ? ` · about ${seconds(t.eta_s)} left in this epoch` : ""));
  }
  return h("section", { id: "progress" }, h("h2", {}, "Progress"), lines, evaluationTable(state.evaluation));
}

// One row per model and combiner, one cell per attack: how many examples are done, and the accuracy so far.
function evaluationTable(evaluation) {
  if (!evaluation.size) return null;
  const progress = [...evaluation.values()];
  const attacks = [...new Set(progress.map((p) => p.attack))];
  const rows = new Map();
  for (const p of progress) {
    const key = `${p.model} ${p.combiner}`;
    if (!rows.has(key)) rows.set(key, new Map());
    rows.get(key).set(p.attack, p);
  }
  const cell = (p) => (p ? h("td", { "data-eval": `${p.model}/${p.combiner}/${p.attack}`,
    title: `${p.done}/${p.total} examples${p.done < p.total ? `, about ${seconds(p.eta_s)} left` : ""}` },
  bar(p.total ? p.done / p.total : 0), ` ${number(p.accuracy)}`) : h("td"));
  return [h("p", { class: "muted" }, "Evaluation: accuracy (%) so far on the examples done, per attack"),
    h("table", { id: "evaluation-progress" }, h("thead", {}, h("tr", {}, h("th", {}, "model, combiner"),
      attacks.map((a) => h("th", {}, a)))), h("tbody", {}, [...rows].map(([key, cells]) => h("tr", {},
      h("th", {}, key), attacks.map((a) => cell(cells.get(a)))))))];
}

function curves(metrics) {
  const keys = new Set();
  for (const m of metrics) for (const [k, v] of Object.entries(m.values)) if (typeof v === "number") keys.add(k);
  const rank = (k) => (k === "loss" ? 0 : /acc/.test(k) ? 1 : 2);
  const shown = [...keys].filter((k) => !NOT_CURVES.has(k)).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const phases = [...new Set(metrics.map((m) => m.phase))];
  const charts = shown.map((key) => lineChart(key, phases.map((phase) => ({ label: phase,
    points: metrics.filter((m) => m.phase === phase).map((m) => [m.epoch, m.values[key]]) }))));
  return h("section", { id: "curves" }, h("h2", {}, "Per-epoch curves"),
    charts.length ? h("div", { class: "charts" }, charts) : h("p", { class: "muted" }, "no epoch has finished yet"));
}

function eventLog(events) {
  return h("section", { id: "events" }, h("h2", {}, "Events"),
    h("table", { class: "log" }, h("tbody", {}, events.slice().reverse().map((e) => h("tr", { "data-seq": e.seq,
      "data-kind": e.kind }, h("td", { class: "num" }, e.seq), h("td", {}, when(e.time)), h("td", {}, e.phase || ""),
      h("td", {}, e.kind), h("td", {}, e.message))))));
}

function cancelButton(state, refresh) {
  if (TERMINAL.has(state.experiment.status)) return null;
  const note = h("span", { id: "cancel-note" });
  const button = h("button", { id: "cancel", type: "button", onclick: async () => {
    button.disabled = true;
    try {
      const answer = await post(`/experiments/${state.experiment.id}/cancel`);
      replace(note, ` cancel requested: ${answer.status}`);
      await refresh();
    } catch (error) {
      replace(note, problem(error));
      button.disabled = false;
    }
  } }, state.experiment.status === "cancelling" ? "Cancelling…" : "Cancel");
  return h("p", { class: "actions" }, button, note);
}

// `task` run at most once per `ms`, the calls in between folded into one.
function throttled(task, ms) {
  let waiting = null;
  const run = () => {
    waiting = null;
    task();
  };
  const call = () => { waiting = waiting || setTimeout(run, ms); };
  call.cancel = () => {
    clearTimeout(waiting);
    waiting = null;
  };
  return call;
}

export function experimentPage(root, id) {
  const state = fresh();
  const controller = new AbortController();
  const parts = { summary: h("div"), progress: h("div"), curves: h("div"), results: h("div"), events: h("div") };
  const page = h("div", { id: "experiment", "data-id": id }, parts.summary, parts.results, parts.progress,
    parts.curves, parts.events);

  const render = () => {
    if (!state.experiment) return;
    replace(parts.summary, header(state, cancelButton(state, refresh)));
    replace(parts.progress, progressSection(state));
    replace(parts.curves, curves(state.metrics));
    replace(parts.events, eventLog(state.events));
  };
  const later = throttled(render, 100);
  let asked = 0;
  const refresh = async () => {
    const ticket = ++asked;
    const experiment = await get(`/experiments/${id}`);
    if (ticket !== asked) return;
    state.experiment = experiment;
    later();
  };
  const loadMetrics = async () => {
    state.metrics = (await get(`/experiments/${id}/metrics?limit=5000`)).items;
    later();
  };
  const metricsLater = throttled(() => loadMetrics().catch(() => {}), 500);
  const loadResults = async () => {
    if (state.experiment.status !== "succeeded") return;
    const [results, artifacts] = await Promise.all([get(`/results/${id}`), get(`/results/${id}/artifacts`)]);
    replace(parts.results, renderResults(id, results, artifacts.items));
  };

  const follow = async () => {
    while (!state.ended && !controller.signal.aborted) {
      try {
        for await (const message of serverEvents(`/experiments/${id}/events?after=${state.last}`, controller.signal)) {
          if (message.event === "end") {
            state.ended = true;
            break;
          }
          const event = JSON.parse(message.data);
          absorb(state, event);
          if (event.kind === "epoch") metricsLater();
          if (event.kind === "status") refresh();
          later();
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        replace(parts.events, problem(error));
      }
      if (!state.ended) await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
    if (state.ended) {
      await refresh();
      await loadMetrics();
      await loadResults().catch((error) => replace(parts.results, problem(error)));
      later.cancel();
      render();
      page.dataset.ended = state.experiment.status;
    }
  };

  replace(root, page);
  refresh().then(loadMetrics).then(follow).catch((error) => replace(parts.summary, problem(error)));
  return () => {
    controller.abort();
    later.cancel();
    metricsLater.cancel();
  };
}
