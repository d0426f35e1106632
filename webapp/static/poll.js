// Poll the study's JSON until it is done, then reload to show the result.
(function () {
  "use strict";
  var url = document.body.getAttribute("data-poll-url");
  if (!url) { return; }
  function tick() {
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (body && body.done) { window.location.reload(); return; }
        if (body) { document.getElementById("status").textContent = body.status; }
        window.setTimeout(tick, 1500);
      })
      .catch(function () { window.setTimeout(tick, 3000); });
  }
  window.setTimeout(tick, 1000);
})();
