
(function () {
  "use strict";
  var body = document.body, $ = function (id) { return document.getElementById(id); };
  var filter = $("filter"), sortBy = $("sort"), help = $("help");
  var shows = { positive: $("show-positive"), negative: $("show-negative"), spurious: $("show-spurious") };
  var hits = Array.prototype.slice.call(document.querySelectorAll("li.hit"));
  var queries = Array.prototype.slice.call(document.querySelectorAll("section.query"));
  var links = Array.prototype.slice.call(document.querySelectorAll("nav.queries a"));
  hits.forEach(function (h) {
    h.searchText = (h.querySelector(".tokens").textContent + "\n" + h.querySelector(".prov").textContent).toLowerCase();
  });
  function apply() {
    var needle = filter.value.trim().toLowerCase(), shown = 0;
    body.classList.toggle("hide-positive", !shows.positive.checked);
    body.classList.toggle("hide-negative", !shows.negative.checked);
    hits.forEach(function (h) {
      var hide = (needle !== "" && h.searchText.indexOf(needle) < 0) || (!shows.spurious.checked && h.dataset.spurious === "1");
      h.classList.toggle("filtered", hide);
    });
    document.querySelectorAll(".count").forEach(function (c) {
      var n = c.closest(".side").querySelectorAll("li.hit:not(.filtered)").length;
      c.textContent = n === +c.dataset.total ? String(n) : n + " of " + c.dataset.total;
    });
    hits.forEach(function (h) { if (visible(h)) { shown += 1; } });
    $("status").textContent = shown + " of " + hits.length + " sequences shown";
  }
  function sortHits() {
    var key = sortBy.value;
    var value = { score: function (h) { return -parseFloat(h.dataset.score); },
                  abs: function (h) { return -Math.abs(parseFloat(h.dataset.score)); },
                  rank: function (h) { return parseFloat(h.dataset.rank); } }[key];
    document.querySelectorAll("ol.hits").forEach(function (ol) {
      var items = Array.prototype.slice.call(ol.querySelectorAll("li.hit"));
      items.sort(function (a, b) { return value(a) - value(b); });
      items.forEach(function (li) { ol.appendChild(li); });
    });
  }
  function visible(el) { return el.getClientRects().length > 0; }
  var current = null;
  function focus(el, block) {
    if (!el) { return; }
    if (current) { current.classList.remove("focused"); }
    current = el; el.classList.add("focused"); el.focus({ preventScroll: true });
    el.scrollIntoView({ block: block || "nearest" });
    var query = el.closest("section.query");
    links.forEach(function (a) { a.classList.toggle("active", query !== null && a.dataset.target === query.id); });
  }
  function step(list, delta) {
    list = list.filter(visible);
    if (!list.length) { return; }
    var order = Array.prototype.slice.call(document.querySelectorAll("li.hit, section.query"));
    var at = current ? order.indexOf(current) : -1, pick = null;
    if (delta > 0) { pick = list.filter(function (el) { return order.indexOf(el) > at; })[0] || list[list.length - 1]; }
    else { var before = list.filter(function (el) { return order.indexOf(el) < at; }); pick = before[before.length - 1] || list[0]; }
    focus(pick, pick.tagName === "SECTION" ? "start" : "nearest");
  }
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.target === filter) { if (e.key === "Escape" || e.key === "Enter") { filter.blur(); } return; }
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") { return; }
    var moves = { j: [hits, 1], ArrowDown: [hits, 1], k: [hits, -1], ArrowUp: [hits, -1],
                  n: [queries, 1], ArrowRight: [queries, 1], p: [queries, -1], ArrowLeft: [queries, -1] };
    if (moves[e.key]) { e.preventDefault(); step(moves[e.key][0], moves[e.key][1]); }
    else if (e.key === "/") { e.preventDefault(); filter.focus(); }
    else if (e.key === "?") { help.classList.toggle("open"); }
    else if (e.key === "Escape") { help.classList.remove("open"); }
  });
  filter.addEventListener("input", apply);
  Object.keys(shows).forEach(function (k) { shows[k].addEventListener("change", apply); });
  sortBy.addEventListener("change", sortHits);
  $("help-button").addEventListener("click", function () { help.classList.toggle("open"); });
  help.addEventListener("click", function () { help.classList.remove("open"); });
  hits.concat(queries).forEach(function (el) {
    el.addEventListener("click", function (e) { e.stopPropagation(); focus(el); });
  });
  links.forEach(function (a) {
    a.addEventListener("click", function (e) { e.preventDefault(); focus($(a.dataset.target), "start"); });
  });
  apply();
  body.dataset.ready = "1";
})();
