// Redline console: refreshes the page's main part when the local replica changes
// (server-sent events from /events). Nothing polls; forms work without this script.
(function () {
  "use strict";
  let busy = false, again = false;
  function editing() {
    const el = document.activeElement;
    return el && el.closest("main") && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName) && el.value !== el.defaultValue;
  }
  async function refresh() {
    if (busy) { again = true; return; }
    if (editing()) { setTimeout(refresh, 1000); return; }
    busy = true;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.querySelector("main");
        const main = document.querySelector("main");
        if (fresh && main) { main.innerHTML = fresh.innerHTML; document.dispatchEvent(new Event("redline:refreshed")); }
      }
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }
  const events = new EventSource("/events");
  events.addEventListener("changed", refresh);
})();
