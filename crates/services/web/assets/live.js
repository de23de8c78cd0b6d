// The live parts of a page: an element with `data-feed` is replaced by what the server
// sends on that server-sent event stream (`update`, and `settled` once nothing more will
// change). No polling; the browser reconnects on its own after a pause.
"use strict";
(function () {
  var part = document.querySelector("[data-feed]");
  if (!part || !window.EventSource) return;
  var feed = new EventSource(part.getAttribute("data-feed"));
  function show(event) { part.innerHTML = event.data; }
  feed.addEventListener("update", show);
  feed.addEventListener("settled", function (event) { show(event); feed.close(); });
  window.addEventListener("pagehide", function () { feed.close(); });
})();
