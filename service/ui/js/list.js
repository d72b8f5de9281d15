// Experiments and studies, newest first, filtered by status (the filter lives in the address: #/?status=running).

import { get } from "./api.js";
import { STATUSES, badge, bar, h, problem, replace, when } from "./dom.js";

const PAGE = 50;
const STUDY_PAGE = 200;

function address(statuses, offset) {
  const query = new URLSearchParams(statuses.map((s) => ["status", s]));
  if (offset) query.set("offset", offset);
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

function filter(statuses) {
  const boxes = STATUSES.map((s) => h("label", { class: "filter" },
    h("input", { type: "checkbox", name: "status", value: s, checked: statuses.includes(s), onchange: () => {
      location.hash = address(boxes.filter((b) => b.querySelector("input").checked).map((b) => b.textContent), 0);
    } }), s));
  return h("p", { id: "status-filter" }, "Status: ", boxes, statuses.length ? "" : " (showing every status)");
}

function experimentRows(items) {
  return items.map((e) => h("tr", { "data-id": e.id, "data-status": e.status },
    h("td", {}, h("a", { href: `#/experiments/${e.id}` }, e.name)), h("td", {}, badge(e.status)),
    h("td", {}, e.study_id ? h("a", { href: `#/studies/${e.study_id}` }, "study") : ""),
    h("td", { class: "num" }, e.priority), h("td", { class: "num" }, e.attempt), h("td", {}, when(e.created_at)),
    h("td", {}, when(e.finished_at)), h("td", { class: "error" }, e.error || "")));
}

function experimentsTable(page, statuses) {
  const pager = h("p", { class: "pager" }, `${page.total} experiment(s)`,
    page.offset > 0 ? h("a", { href: address(statuses, Math.max(0, page.offset - PAGE)) }, " ← newer") : null,
    page.offset + page.items.length < page.total
      ? h("a", { href: address(statuses, page.offset + PAGE) }, " older →") : null);
  return [pager, h("table", { id: "experiments" }, h("thead", {}, h("tr", {}, ["name", "status", "", "priority",
    "attempt", "created", "finished", "error"].map((c) => h("th", {}, c)))), h("tbody", {}, experimentRows(page.items)))];
}

function studiesTable(page, statuses) {
  const items = statuses.length ? page.items.filter((s) => statuses.includes(s.status)) : page.items;
  const rows = items.map((s) => h("tr", { "data-id": s.id, "data-status": s.status },
    h("td", {}, h("a", { href: `#/studies/${s.id}` }, s.name)), h("td", {}, badge(s.status)),
    h("td", {}, bar(s.progress), ` ${Object.entries(s.counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`)
      .join(", ")}`), h("td", { class: "num" }, s.runs), h("td", {}, when(s.created_at))));
  return [h("p", {}, `${items.length} of the ${page.items.length} newest of ${page.total} studies`),
    h("table", { id: "studies" }, h("thead", {}, h("tr", {}, ["name", "status", "progress", "runs", "created"]
      .map((c) => h("th", {}, c)))), h("tbody", {}, rows))];
}

export function listPage(root, query) {
  const statuses = query.getAll("status").filter((s) => STATUSES.includes(s));
  const offset = Number(query.get("offset")) || 0;
  const experiments = h("div", {}, h("p", {}, "Loading…"));
  const studies = h("div", {}, h("p", {}, "Loading…"));
  replace(root, h("div", { id: "list" }, h("h1", {}, "Experiments and studies"), filter(statuses),
    h("h2", {}, "Experiments"), experiments, h("h2", {}, "Studies"), studies));
  const params = new URLSearchParams([...statuses.map((s) => ["status", s]), ["limit", PAGE], ["offset", offset]]);
  get(`/experiments?${params}`).then((page) => replace(experiments, experimentsTable(page, statuses)),
    (error) => replace(experiments, problem(error)));
  get(`/studies?limit=${STUDY_PAGE}`).then((page) => replace(studies, studiesTable(page, statuses)),
    (error) => replace(studies, problem(error)));
  return () => {};
}
