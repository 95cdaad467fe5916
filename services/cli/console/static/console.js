// Live parts of a page: its event stream sends {target, html}; the element with that id gets
// the new content (rendered on the server, like the rest of the page).
(function () {
  "use strict";
  var holder = document.querySelector("[data-events]");
  if (!holder || !window.EventSource) {
    return;
  }
  var source = new EventSource(holder.getAttribute("data-events"));
  source.addEventListener("fragment", function (event) {
    var part = JSON.parse(event.data);
    var element = document.getElementById(part.target);
    if (element) {
      element.innerHTML = part.html;
      element.setAttribute("data-updated", String(Date.now()));
    }
  });
  window.addEventListener("pagehide", function () { source.close(); });
})();
