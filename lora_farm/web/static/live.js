// lora-farm dashboard: live parts and the action token. No framework, no build step.
"use strict";

const TOKEN_KEY = "lorafarm-token";

// Every element with data-live="URL" is replaced by a fresh render of URL every 2 s.
// A log that was scrolled to its end stays at its end; a request in flight is not doubled.
function refresh(element) {
  if (element.dataset.busy) return;
  element.dataset.busy = "1";
  const log = element.querySelector("pre.log");
  const atEnd = !log || log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  fetch(element.dataset.live, {headers: {"Accept": "text/html"}})
    .then((response) => (response.ok ? response.text() : null))
    .then((html) => {
      if (html === null) return;
      element.innerHTML = html;
      const fresh = element.querySelector("pre.log");
      if (fresh && atEnd) fresh.scrollTop = fresh.scrollHeight;
    })
    .catch(() => {})
    .finally(() => { delete element.dataset.busy; });
}

function startLive() {
  const parts = document.querySelectorAll("[data-live]");
  if (!parts.length) return;
  const every = Number(document.body.dataset.liveMs || 2000);
  setInterval(() => parts.forEach(refresh), every);
  document.querySelectorAll("pre.log").forEach((log) => { log.scrollTop = log.scrollHeight; });
}

// The token lives in this tab (sessionStorage) and goes into each action form when it is sent.
function startToken() {
  const input = document.getElementById("token");
  if (!input) return;
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  input.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, input.value));
  document.addEventListener("submit", (event) => {
    const field = event.target.querySelector(".token-field");
    if (field) field.value = input.value;
  });
}

document.addEventListener("DOMContentLoaded", () => { startLive(); startToken(); });
