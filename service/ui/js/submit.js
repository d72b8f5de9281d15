// Submitting an experiment or a study: the spec pasted or read from a file, sent as it is (YAML, or JSON when it
// is a JSON object) to POST /experiments or /studies with the token; a 422's problems are listed by field path.

import { post } from "./api.js";
import { h, problem, replace } from "./dom.js";

const ROUTES = { experiment: "/experiments", study: "/studies" };

function mediaType(text) {
  return text.trimStart().startsWith("{") ? "application/json" : "application/yaml";
}

function refusal(error) {
  if (!error.problems.length) {
    const hint = error.status === 401 || error.status === 503 ? " (enter the API token at the top of the page)" : "";
    return h("div", { id: "submit-error" }, h("p", { class: "error" }, `The API refused it: ${error.message}${hint}`));
  }
  return h("div", { id: "submit-error" },
    h("p", { class: "error" }, `The API refused the spec (${error.status}):`),
    h("ul", { id: "problems" }, error.problems.map((p) => h("li", { "data-field": p.field },
      h("code", {}, p.field), `: ${p.msg}`))),
    error.omitted ? h("p", {}, `… and ${error.omitted} more`) : null);
}

function accepted(kind, body) {
  const href = kind === "study" ? `#/studies/${body.id}` : `#/experiments/${body.id}`;
  return h("p", { id: "submitted", class: "pass" }, `Queued ${kind} ${body.name}: `,
    h("a", { href }, body.id), ` (${body.status})`);
}

export function submitPage(root) {
  const text = h("textarea", { id: "spec-text", rows: 22, spellcheck: "false",
    placeholder: "name: my-run\ndataset: {name: digits}\n…" });
  const file = h("input", { id: "spec-file", type: "file", accept: ".yaml,.yml,.json", onchange: async () => {
    if (file.files[0]) text.value = await file.files[0].text();
  } });
  const kind = h("select", { id: "spec-kind" }, h("option", { value: "experiment" }, "experiment (ExperimentSpec)"),
    h("option", { value: "study" }, "study (StudySpec)"));
  const priority = h("input", { id: "priority", type: "number", min: -1000, max: 1000, value: 0 });
  const outcome = h("div", { id: "submit-outcome" });
  const send = async (event) => {
    event.preventDefault();
    replace(outcome, h("p", {}, "Submitting…"));
    try {
      const body = await post(`${ROUTES[kind.value]}?priority=${Number(priority.value) || 0}`,
        { body: text.value, contentType: mediaType(text.value) });
      replace(outcome, accepted(kind.value, body));
    } catch (error) {
      replace(outcome, error.problems ? refusal(error) : problem(error));
    }
  };
  replace(root, h("div", { id: "submit" }, h("h1", {}, "Submit"),
    h("p", {}, "Paste a spec, the YAML that ", h("code", {}, "igat run"), " or ", h("code", {}, "igat study"),
      " reads, or choose its file. The API validates it; submitting needs the API token."),
    h("form", { onsubmit: send },
      h("p", {}, h("label", {}, "Kind ", kind), " ", h("label", {}, "Priority ", priority), " ", file),
      text, h("p", {}, h("button", { type: "submit", id: "submit-button" }, "Submit"))),
    outcome));
  return () => {};
}
