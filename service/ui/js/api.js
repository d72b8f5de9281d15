// The REST API as the pages use it: every request carries the token the user gave (sessionStorage), and the
// event stream is read with fetch(), since an EventSource cannot send an Authorization header.

const TOKEN_KEY = "igat.api-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const value = token();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : extra;
}

// A refused request: the status, the API's detail (a string, or a 422's list of {field, msg}) and its message.
export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body === "object" ? body.detail : body;
    const text = typeof detail === "string" ? detail : (body && body.message) || `HTTP ${status}`;
    super(`${status}: ${text}`);
    this.status = status;
    this.problems = Array.isArray(detail) ? detail : [];
    this.omitted = (body && body.omitted) || 0;
  }
}

export async function request(method, path, { body, contentType, signal } = {}) {
  const init = { method, signal, headers: headers(contentType ? { "Content-Type": contentType } : {}) };
  if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  const text = await response.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: kept as text
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path, options) => request("GET", path, options);
export const post = (path, options) => request("POST", path, options);

// A URL for a file the page shows or saves: the file itself when no token is needed, else a blob fetched with it.
export async function fileUrl(path) {
  if (!token()) return path;
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, await response.text());
  return URL.createObjectURL(await response.blob());
}

// Server-sent events of `path` as {id, event, data} objects, until the stream ends or `signal` aborts it.
export async function* serverEvents(path, signal) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw new ApiError(response.status, await response.text());
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (message.data !== undefined) yield message;
        message = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        message[field] = field === "data" && message.data !== undefined ? `${message.data}\n${text}` : text;
      }
    }
  }
}
