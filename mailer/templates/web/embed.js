// The "Copy" button of /embed: served from our own origin (the page's CSP allows script from
// 'self' only, never inline). Without it the button stays hidden and the snippet is selectable.
"use strict";
(function () {
  var button = document.getElementById("copy-snippet");
  var status = document.getElementById("copy-status");
  var code = document.getElementById("snippet");
  if (!button || !status || !code || !navigator.clipboard) {
    return;
  }
  button.hidden = false;
  button.addEventListener("click", function () {
    navigator.clipboard.writeText(code.textContent).then(
      function () {
        status.textContent = "Copied the snippet to the clipboard.";
      },
      function (error) {
        status.textContent = "Could not copy (" + error.name + "): select the snippet and copy it.";
      }
    );
  });
})();
