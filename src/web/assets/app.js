// runner dashboard: fills the server-rendered tables from the live feed
// (/live, server-sent events). Everything from the feed is written with
// textContent; the only links are /turn/<id> paths. Data is never parsed as
// markup.
"use strict";
(function () {
  var live = document.getElementById("live");
  function setStatus(text, cls) {
    live.textContent = text;
    live.className = cls;
  }
  function fill(id, rows) {
    var table = document.getElementById(id);
    if (!table || !Array.isArray(rows)) return;
    var body = document.createElement("tbody");
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (cell) {
        var td = document.createElement("td");
        if (typeof cell.c === "string") td.className = cell.c;
        var text = String(cell.t == null ? "" : cell.t);
        if (typeof cell.h === "string" && /^\/turn\/[A-Za-z0-9._:-]+$/.test(cell.h)) {
          var a = document.createElement("a");
          a.setAttribute("href", cell.h);
          a.textContent = text;
          td.appendChild(a);
        } else {
          td.textContent = text;
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    table.replaceChild(body, table.tBodies[0]);
  }
  var lastChart = null;
  function apply(s) {
    fill("agents", s.agents);
    document.getElementById("agents-note").textContent = String(s.agents_note || "");
    fill("mail", s.mail);
    fill("turns", s.turns);
    document.getElementById("at").textContent = String(s.at);
    if (s.chart !== lastChart) {
      if (lastChart !== null) {
        document.getElementById("chart").setAttribute("src", "/chart.svg?v=" + encodeURIComponent(s.chart));
      }
      lastChart = s.chart;
    }
  }
  if (!window.EventSource) return;
  var es = new EventSource("/live");
  es.addEventListener("snapshot", function (e) {
    try {
      apply(JSON.parse(e.data));
      setStatus("live", "ok");
    } catch (err) {
      setStatus("bad update", "bad");
    }
  });
  es.onerror = function () {
    setStatus("reconnecting", "bad");
  };
})();
