// The pages, one per address after '#': #/ (the lists), #/experiments/ID, #/studies/ID, #/submit.

import { setToken, token } from "./api.js";
import { replace } from "./dom.js";
import { experimentPage } from "./experiment.js";
import { listPage } from "./list.js";
import { studyPage } from "./study.js";
import { submitPage } from "./submit.js";

const root = document.getElementById("page");
let leave = () => {};

function route() {
  leave();
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "experiments" && parts[1]) leave = experimentPage(root, parts[1]);
  else if (parts[0] === "studies" && parts[1]) leave = studyPage(root, parts[1]);
  else if (parts[0] === "submit") leave = submitPage(root);
  else leave = listPage(root, new URLSearchParams(query));
}

function showToken() {
  replace(document.getElementById("token-state"), token() ? "token set for this tab" : "no token");
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  setToken(input.value.trim());
  input.value = "";
  showToken();
  route();
});
document.getElementById("token-forget").addEventListener("click", () => {
  setToken("");
  showToken();
  route();
});
window.addEventListener("hashchange", route);
showToken();
route();
