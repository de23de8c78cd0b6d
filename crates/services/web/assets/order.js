// The order page's live part: the server sends the rendered progress each time the saga
// moves (server-sent events), and this swaps it in. No polling; the browser reconnects on
// its own after a pause, resuming from the last event it saw.
"use strict";
(function () {
  var section = document.getElementById("progress");
  if (!section || !window.EventSource) return;
  var feed = new EventSource(section.getAttribute("data-feed"));
  function show(event) { section.innerHTML = event.data; }
  feed.addEventListener("progress", show);
  feed.addEventListener("settled", function (event) { show(event); feed.close(); });
  window.addEventListener("pagehide", function () { feed.close(); });
})();
