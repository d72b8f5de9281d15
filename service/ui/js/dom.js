// Building the page: elements from tag, attributes and children (text is always set as text, never as HTML),
// and the formats every page shares.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

// A number as the tables show it: two decimals (signed ones with their sign); NaN and the like as the API sent them.
export function number(value, { digits = 2, signed = false } = {}) {
  if (value === null || value === undefined) return "n/a";
  if (typeof value !== "number") return String(value);
  const text = value.toFixed(digits);
  return signed && value >= 0 ? `+${text}` : text;
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function seconds(value) {
  if (typeof value !== "number") return "";
  if (value < 90) return `${value.toFixed(0)} s`;
  if (value < 5400) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];

export function badge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, status);
}

export function bar(fraction, label) {
  const percent = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("span", { class: "bar", title: label || `${percent.toFixed(0)} %` },
    h("span", { class: "bar-fill", style: `width: ${percent.toFixed(1)}%` }));
}

export function problem(error) {
  return h("p", { class: "error" }, error.message || String(error));
}
