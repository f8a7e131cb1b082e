// The staff console's one script, served from /staff/static/console.js (no inline script).
// On the dashboard: keeps each countdown ticking, and while a send is in progress polls
// /staff/progress.json every 2 seconds and updates its numbers and bar in place. Without it
// the page shows the numbers as of its load, with a reload link.
(function () {
  "use strict";
  var POLL_MS = 2000;

  function duration(seconds) {
    var minutes = Math.floor(seconds / 60);
    var days = Math.floor(minutes / 1440);
    minutes -= days * 1440;
    var hours = Math.floor(minutes / 60);
    minutes -= hours * 60;
    if (days) { return hours ? days + " d " + hours + " h" : days + " d"; }
    if (hours) { return minutes ? hours + " h " + minutes + " min" : hours + " h"; }
    return minutes ? minutes + " min" : "";
  }

  // The server's clock, not the browser's: the countdown says what the page said at load.
  var skew = 0;

  function tick() {
    var now = Date.now() + skew;
    document.querySelectorAll("time[data-countdown]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) { return; }
      var seconds = (at - now) / 1000;
      var text = duration(Math.abs(seconds));
      if (!text) { el.textContent = seconds < 0 ? "now" : "in under a minute"; }
      else { el.textContent = seconds < 0 ? text + " ago" : "in " + text; }
    });
  }

  function number(n) { return Number(n).toLocaleString("en-US"); }

  function setField(card, name, value) {
    var el = card.querySelector('[data-field="' + name + '"]');
    if (el && el.textContent !== value) { el.textContent = value; }
  }

  function update(section, data) {
    var seen = {};
    (data.sending || []).forEach(function (send) {
      seen[send.id] = true;
      var card = section.querySelector('[data-issue="' + send.id + '"]');
      if (!card) { return; }
      setField(card, "sent", number(send.counts.sent));
      setField(card, "deferred", number(send.counts.deferred));
      setField(card, "failed", number(send.counts.failed));
      setField(card, "left", number(send.left));
      setField(card, "rate", send.rate_text);
      setField(card, "time-left", send.left_text);
      send.segments.forEach(function (seg) {
        var rect = card.querySelector('rect[data-seg="' + seg.name + '"]');
        if (rect) {
          rect.setAttribute("x", String(seg.x));
          rect.setAttribute("width", String(seg.width));
        }
      });
    });
    var active = 0;
    section.querySelectorAll("[data-issue]").forEach(function (card) {
      if (seen[card.getAttribute("data-issue")]) { active += 1; return; }
      if (!card.hasAttribute("data-finished")) {
        card.setAttribute("data-finished", "");
        setField(card, "left", "0");
        setField(card, "time-left", "finished: reload for the final numbers");
      }
    });
    var asOf = section.querySelector("[data-as-of]");
    if (asOf && data.as_of_text) { asOf.textContent = data.as_of_text; }
    return active > 0 || (data.sending || []).length > 0;
  }

  // The session has ended (logged out, idle too long, account removed): polling stops, and
  // the section says so with a link to the login page.
  function ended(section) {
    if (section.querySelector("[data-session-ended]")) { return; }
    var note = document.createElement("p");
    note.className = "error";
    note.setAttribute("data-session-ended", "");
    note.setAttribute("role", "alert");
    note.appendChild(document.createTextNode("Your session has ended: "));
    var link = document.createElement("a");
    link.href = section.getAttribute("data-login-url") || "login";
    link.textContent = "log in again";
    note.appendChild(link);
    section.insertBefore(note, section.firstChild);
  }

  function poll(section) {
    var url = section.getAttribute("data-progress-url");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) { ended(section); return null; }
        if (!response.ok) { throw new Error("progress " + response.status); }
        return response.json();
      })
      .then(function (data) {
        if (data === null) { return; }
        if (update(section, data)) { window.setTimeout(function () { poll(section); }, POLL_MS); }
      })
      .catch(function () {
        // A failed poll (server restarting, network down): try again later, a little slower.
        window.setTimeout(function () { poll(section); }, POLL_MS * 5);
      });
  }

  function start() {
    var marked = document.querySelector("[data-server-now]");
    var server = marked ? Date.parse(marked.getAttribute("data-server-now")) : NaN;
    if (!isNaN(server)) { skew = server - Date.now(); }
    tick();
    window.setInterval(tick, 30000);
    var section = document.querySelector("[data-progress-url]");
    if (section && section.querySelector("[data-issue]")) {
      window.setTimeout(function () { poll(section); }, POLL_MS);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
