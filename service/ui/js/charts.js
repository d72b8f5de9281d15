// Inline SVG: per-epoch curves, and the small error bars of a study's tables.

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  for (const child of children) element.append(child instanceof Node ? child : document.createTextNode(child));
  return element;
}

function extent(values) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) [low, high] = [low - 1, high + 1];
  return [low, high];
}

// One line per series ({label, points: [[x, y], ...]}), y against x, with the axes' ranges written at their ends.
export function lineChart(title, series, { width = 320, height = 180 } = {}) {
  const finite = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const chart = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`,
    "data-chart": title, "data-points": finite.length });
  chart.append(svg("text", { x: 4, y: 14, class: "chart-title" }, title));
  if (!finite.length) return chart;
  const pad = { left: 44, right: 8, top: 22, bottom: 30 };
  const [x0, x1] = extent(finite.map(([x]) => x));
  const [y0, y1] = extent(finite.map(([, y]) => y));
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  chart.append(svg("rect", { x: pad.left, y: pad.top, width: width - pad.left - pad.right,
    height: height - pad.top - pad.bottom, class: "chart-frame" }));
  chart.append(svg("text", { x: pad.left - 4, y: pad.top + 8, class: "tick end" }, y1.toPrecision(3)));
  chart.append(svg("text", { x: pad.left - 4, y: height - pad.bottom, class: "tick end" }, y0.toPrecision(3)));
  chart.append(svg("text", { x: pad.left, y: height - pad.bottom + 12, class: "tick" }, `epoch ${x0}`));
  chart.append(svg("text", { x: width - pad.right, y: height - pad.bottom + 12, class: "tick end" }, `${x1}`));
  series.forEach((s, i) => {
    const points = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const colour = COLOURS[i % COLOURS.length];
    chart.append(svg("polyline", { points: points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "),
      fill: "none", stroke: colour, "stroke-width": 1.5 }));
    for (const [x, y] of points) chart.append(svg("circle", { cx: sx(x), cy: sy(y), r: 2, fill: colour }));
    chart.append(svg("text", { x: pad.left + 4 + 90 * i, y: height - 4, fill: colour, class: "legend" }, s.label));
  });
  return chart;
}

// A range [low, high] around `mean` on the scale [min, max] (zero marked when the scale crosses it).
export function errorBar(mean, low, high, [min, max], { width = 90, height = 12 } = {}) {
  const span = max - min || 1;
  const sx = (v) => 2 + ((v - min) / span) * (width - 4);
  const bar = svg("svg", { class: "errorbar", width, height, viewBox: `0 0 ${width} ${height}` });
  if (min < 0 && max > 0) bar.append(svg("line", { x1: sx(0), x2: sx(0), y1: 0, y2: height, class: "zero" }));
  if (Number.isFinite(low) && Number.isFinite(high)) {
    bar.append(svg("line", { x1: sx(low), x2: sx(high), y1: height / 2, y2: height / 2, class: "range" }));
    for (const end of [low, high]) {
      bar.append(svg("line", { x1: sx(end), x2: sx(end), y1: 2, y2: height - 2, class: "range" }));
    }
  }
  if (Number.isFinite(mean)) bar.append(svg("circle", { cx: sx(mean), cy: height / 2, r: 2.5, class: "mean" }));
  return bar;
}
