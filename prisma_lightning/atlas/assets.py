"""The static site's stylesheet, script and HTML shells (kept as strings so they install with the package).

Pages build their DOM with ``textContent`` / ``setAttribute`` only (never ``innerHTML`` with data), and load
their data with ``<script src>`` files, which work from ``file://`` where ``fetch()`` of local files does not.
"""

from __future__ import annotations

CSS = """\
:root { --fg: #1d2330; --muted: #667085; --line: #e3e6ec; --accent: #c2410c; --bg: #fafbfc; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
header { padding: 14px 22px 10px; border-bottom: 1px solid var(--line); background: #fff; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header .meta { color: var(--muted); font-size: 13px; }
header nav a { margin-right: 14px; }
main { padding: 14px 22px 40px; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.controls { display: flex; gap: 14px; align-items: center; margin: 6px 0 10px; flex-wrap: wrap; }
.controls input[type=search] { width: 340px; padding: 6px 9px; border: 1px solid #cbd2dc; border-radius: 6px; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #f3f5f8; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
td.text, th.text { text-align: left; }
td img.thumb { width: 40px; height: 40px; object-fit: contain; image-rendering: pixelated; background: #000;
               vertical-align: middle; }
.pager { margin: 10px 0; display: flex; gap: 10px; align-items: center; }
.pager button { padding: 3px 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { width: 150px; }
.tile .frame { position: relative; width: 150px; height: 150px; background: #000; }
.tile img { width: 150px; height: 150px; object-fit: contain; image-rendering: pixelated; display: block; }
.tile .heat { position: absolute; inset: 0; display: grid; pointer-events: none; }
.tile .cap { font-size: 12px; color: var(--muted); margin-top: 3px; }
body.noheat .heat { display: none; }
section { margin: 18px 0 8px; }
.factors { display: flex; flex-wrap: wrap; gap: 8px 28px; }
section h2 { font-size: 15px; margin: 0 0 8px; }
.stats span { margin-right: 18px; }
.bars div.row { display: flex; align-items: center; gap: 8px; font-size: 12px; margin: 2px 0; }
.bars div.bar { background: var(--accent); height: 11px; }
.bars span.name { width: 120px; text-align: right; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
svg.hist rect { fill: var(--accent); }
svg.hist text { font-size: 10px; fill: var(--muted); }
.pill { display: inline-block; padding: 1px 8px; border: 1px solid var(--line); border-radius: 10px; margin: 2px;
        background: #fff; font-size: 12px; }
.muted { color: var(--muted); }
"""

JS = r"""
(function () {
  "use strict";
  var A = window.Atlas = window.Atlas || {};
  var chunks = {};

  function el(tag, attrs) {
    var e = document.createElement(tag);
    var a = attrs || {};
    Object.keys(a).forEach(function (k) {
      if (k === "text") e.textContent = a[k];
      else if (k === "cls") e.className = a[k];
      else e.setAttribute(k, a[k]);
    });
    for (var i = 2; i < arguments.length; i++) if (arguments[i] != null) e.append(arguments[i]);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || (typeof x === "number" && !isFinite(x))) return "\u2013";
    if (x === 0) return "0";
    var d = digits || 3, ax = Math.abs(x);
    return (ax >= 1e-3 && ax < 1e5) ? String(Number(x.toPrecision(d))) : x.toExponential(d - 1);
  }
  function imgPath(id) { return "images/" + id + ".png"; }
  function header(meta, here) {
    var nav = el("nav", {},
      el("a", {href: "index.html", text: "All features"}),
      meta.ground_truth ? el("a", {href: "ground_truth.html", text: "Ground truth"}) : null);
    var h = el("header", {},
      el("h1", {text: meta.title}),
      el("div", {cls: "meta", text: meta.modelId + " \u00b7 " + meta.layer + " \u00b7 tokens: " + meta.tokens +
        " \u00b7 " + meta.d_sae + " features \u00b7 " + meta.n_images + " images \u00b7 top " + meta.top_k}),
      nav);
    document.title = (here ? here + " \u2013 " : "") + meta.title;
    return h;
  }

  // ------------------------------------------------------------------ index page
  A.index = function () {
    var D = window.ATLAS_INDEX, meta = D.meta, n = meta.d_sae;
    var cols = [
      {key: "index", label: "#", get: function (i) { return i; }},
      {key: "freq", label: "frequency", get: function (i) { return D.freq[i]; }, f: fmt},
      {key: "fimg", label: "image freq.", get: function (i) { return D.fimg[i]; }, f: fmt},
      {key: "max", label: "max act.", get: function (i) { return D.max[i]; }, f: fmt},
      {key: "mean", label: "mean act. (firing)", get: function (i) { return D.mean[i]; }, f: fmt},
      {key: "purity", label: "label purity", get: function (i) { return D.purity[i]; }, f: fmt},
      {key: "label", label: "top label", text: true, get: function (i) { return D.label[i]; }},
      {key: "thumb", label: "top image", nosort: true}
    ];
    var state = A.state = {sort: "freq", dir: -1, query: "", alive: false, page: 0, pageSize: 100, rows: []};
    var body = document.body;
    body.append(header(meta, ""));
    var main = el("main");
    var search = el("input", {type: "search", id: "search",
      placeholder: "filter: feature number, or text in the top label"});
    var alive = el("input", {type: "checkbox", id: "alive"});
    var count = el("span", {id: "count", cls: "muted"});
    main.append(el("div", {cls: "controls"}, search, el("label", {}, alive, " firing features only"), count));
    var thead = el("tr");
    cols.forEach(function (c) {
      var th = el("th", {"data-key": c.key, text: c.label, cls: c.text ? "text" : ""});
      if (!c.nosort) th.addEventListener("click", function () {
        state.dir = state.sort === c.key ? -state.dir : (c.text ? 1 : -1);
        state.sort = c.key; state.page = 0; refresh();
      });
      thead.append(th);
    });
    var tbody = el("tbody");
    main.append(el("table", {id: "features"}, el("thead", {}, thead), tbody));
    var prev = el("button", {id: "prev", text: "\u2190 previous"});
    var next = el("button", {id: "next", text: "next \u2192"});
    var pageInfo = el("span", {id: "page"});
    main.append(el("div", {cls: "pager"}, prev, pageInfo, next));
    body.append(main);
    prev.addEventListener("click", function () { if (state.page > 0) { state.page--; render(); } });
    next.addEventListener("click", function () {
      if ((state.page + 1) * state.pageSize < state.rows.length) { state.page++; render(); }
    });
    var timer = null;
    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.query = search.value.trim(); state.page = 0; refresh(); }, 120);
    });
    alive.addEventListener("change", function () { state.alive = alive.checked; state.page = 0; refresh(); });

    function matches(i, q, qn) {
      if (state.alive && !(D.freq[i] > 0)) return false;
      if (!q) return true;
      if (qn !== null && (i === qn || String(i).indexOf(q) === 0)) return true;
      var lab = D.label[i];
      return lab !== null && lab.toLowerCase().indexOf(q.toLowerCase()) >= 0;
    }
    function refresh() {
      var q = state.query, qn = /^\d+$/.test(q) ? parseInt(q, 10) : null, rows = [];
      for (var i = 0; i < n; i++) if (matches(i, q, qn)) rows.push(i);
      var col = cols.filter(function (c) { return c.key === state.sort; })[0], dir = state.dir;
      rows.sort(function (a, b) {
        var x = col.get(a), y = col.get(b);
        var xm = x === null || x === undefined || (typeof x === "number" && isNaN(x));
        var ym = y === null || y === undefined || (typeof y === "number" && isNaN(y));
        if (xm || ym) return xm === ym ? a - b : (xm ? 1 : -1);  // missing values last
        if (x < y) return -dir; if (x > y) return dir; return a - b;
      });
      state.rows = rows;
      thead.querySelectorAll("th").forEach(function (th) {
        if (th.dataset.key === state.sort) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        else th.removeAttribute("aria-sort");
      });
      render();
    }
    function render() {
      var start = state.page * state.pageSize, rows = state.rows.slice(start, start + state.pageSize);
      var frag = document.createDocumentFragment();
      rows.forEach(function (i) {
        var tr = el("tr", {"data-feature": String(i)});
        cols.forEach(function (c) {
          var td;
          if (c.key === "index") td = el("td", {}, el("a", {href: "feature.html#" + i, text: String(i)}));
          else if (c.key === "thumb") {
            td = el("td");
            if (D.thumb[i] >= 0) td.append(el("a", {href: "feature.html#" + i},
              el("img", {cls: "thumb", loading: "lazy", alt: "", src: imgPath(D.thumb[i])})));
          } else {
            var v = c.get(i);
            td = el("td", {cls: c.text ? "text" : "", text: c.f ? c.f(v) : (v === null ? "\u2013" : String(v))});
          }
          tr.append(td);
        });
        frag.append(tr);
      });
      tbody.replaceChildren(frag);
      var pages = Math.max(1, Math.ceil(state.rows.length / state.pageSize));
      pageInfo.textContent = "page " + (state.page + 1) + " of " + pages;
      count.textContent = state.rows.length + " of " + n + " features";
      prev.disabled = state.page === 0; next.disabled = state.page + 1 >= pages;
      window.atlasReady = true;
    }
    refresh();
  };

  // ------------------------------------------------------------------ feature page
  A.addChunk = function (c, features) {
    chunks[c] = features;
    if (A._pending === c) A._renderFeature();
  };
  A.feature = function () {
    var meta = window.ATLAS_META;
    document.body.append(header(meta, ""));
    var main = el("main", {id: "main"});
    document.body.append(main);
    A._renderFeature = function () {
      var f = parseInt(location.hash.slice(1), 10);
      if (!(f >= 0 && f < meta.d_sae)) f = 0;
      var c = Math.floor(f / meta.chunk_size);
      if (!chunks[c]) {
        A._pending = c;
        var s = document.createElement("script");
        s.src = "data/features_" + String(c).padStart(5, "0") + ".js";
        document.head.append(s);
        return;
      }
      renderFeature(meta, chunks[c][f - c * meta.chunk_size], main);
      document.title = "Feature " + f + " \u2013 " + meta.title;
      window.atlasReady = true;
    };
    window.addEventListener("hashchange", function () { window.atlasReady = false; A._renderFeature(); });
    A._renderFeature();
  };

  function histogram(meta, counts) {
    var first = -1, last = -1;
    counts.forEach(function (v, i) { if (v > 0) { if (first < 0) first = i; last = i; } });
    if (first < 0) return el("p", {cls: "muted", text: "This feature never fired."});
    var w = 520, h = 120, pad = 18, nb = last - first + 1, bw = (w - 2 * pad) / nb;
    var top = Math.max.apply(null, counts.slice(first, last + 1));
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", w); svg.setAttribute("height", h + 16);
    for (var i = first; i <= last; i++) {
      var r = document.createElementNS(ns, "rect"), bh = counts[i] / top * h;
      r.setAttribute("x", pad + (i - first) * bw); r.setAttribute("y", h - bh);
      r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", bh);
      var t = document.createElementNS(ns, "title");
      t.textContent = fmt(meta.hist_edges[i]) + "\u2013" + fmt(meta.hist_edges[i + 1]) + ": " + counts[i];
      r.append(t); svg.append(r);
    }
    [[pad, meta.hist_edges[first], "start"], [w - pad, meta.hist_edges[last + 1], "end"]].forEach(function (a) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", a[0]); t.setAttribute("y", h + 12); t.setAttribute("text-anchor", a[2]);
      t.textContent = fmt(a[1]); svg.append(t);
    });
    return el("div", {}, svg, el("div", {cls: "muted", text: "firing activations, log-spaced bins"}));
  }
  function bars(items) {  // [[name, count], ...]
    var top = Math.max.apply(null, items.map(function (x) { return x[1]; }).concat([1]));
    var box = el("div", {cls: "bars"});
    items.forEach(function (x) {
      box.append(el("div", {cls: "row"}, el("span", {cls: "name", text: x[0], title: x[0]}),
        el("div", {cls: "bar", style: "width:" + Math.round(200 * x[1] / top) + "px"}),
        el("span", {text: String(x[1])})));
    });
    return box;
  }
  function columns(counts, names) {  // one column per value, in value order
    var w = 240, h = 60, bw = w / counts.length, top = Math.max.apply(null, counts.concat([1]));
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", w); svg.setAttribute("height", h + 14);
    counts.forEach(function (n, v) {
      var r = document.createElementNS(ns, "rect"), bh = n / top * h;
      r.setAttribute("x", v * bw); r.setAttribute("y", h - bh);
      r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", Math.max(bh, 0.5));
      var t = document.createElementNS(ns, "title");
      t.textContent = (names[v] !== undefined ? names[v] : String(v)) + ": " + n;
      r.append(t); svg.append(r);
    });
    [[0, names[0], "start"], [w, names[counts.length - 1], "end"]].forEach(function (a) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", a[0]); t.setAttribute("y", h + 11); t.setAttribute("text-anchor", a[2]);
      t.textContent = a[1] !== undefined ? a[1] : ""; svg.append(t);
    });
    return svg;
  }
  function tile(meta, act) {  // act: [image id, value, label name, [uint8 per patch]]
    var g = meta.patch_grid, frame = el("div", {cls: "frame"});
    frame.append(el("img", {src: imgPath(act[0]), alt: "image " + act[0]}));
    var maps = act[3];
    if (maps && maps.length && g[1] * g[2] > 0) {
      var heat = el("div", {cls: "heat", style: "grid-template-columns:repeat(" + g[2] + ",1fr)"});
      var per = g[1] * g[2];
      for (var p = 0; p < per; p++) {
        var v = 0;
        for (var t = 0; t < g[0]; t++) v = Math.max(v, maps[t * per + p] || 0);
        heat.append(el("div", {style: "background:rgba(255,90,20," + (0.6 * v / 255).toFixed(3) + ")"}));
      }
      frame.append(heat);
    }
    var cap = "act " + fmt(act[1]) + " \u00b7 #" + act[0] + (act[2] !== null ? " \u00b7 " + act[2] : "");
    return el("div", {cls: "tile"}, frame, el("div", {cls: "cap", text: cap}));
  }
  function renderFeature(meta, F, main) {
    var parts = [];
    var nav = el("div", {cls: "controls"},
      F.i > 0 ? el("a", {href: "#" + (F.i - 1), text: "\u2190 feature " + (F.i - 1)}) : null,
      el("strong", {id: "title", text: "Feature " + F.i}),
      F.i + 1 < meta.d_sae ? el("a", {href: "#" + (F.i + 1), text: "feature " + (F.i + 1) + " \u2192"}) : null);
    var heatBox = el("input", {type: "checkbox", id: "heat"});
    heatBox.checked = !document.body.classList.contains("noheat");
    heatBox.addEventListener("change", function () { document.body.classList.toggle("noheat", !heatBox.checked); });
    nav.append(el("label", {}, heatBox, " patch heatmaps"));
    parts.push(nav);
    parts.push(el("div", {cls: "stats"},
      el("span", {text: "frequency " + fmt(F.freq)}), el("span", {text: "image frequency " + fmt(F.fimg)}),
      el("span", {text: "max " + fmt(F.max)}), el("span", {text: "mean (firing) " + fmt(F.mean)}),
      el("span", {text: "mean (all) " + fmt(F.meanAll)}),
      el("span", {text: "label purity " + fmt(F.purity)})));
    var cards = el("div", {cls: "cards", id: "top"});
    F.acts.forEach(function (a) { cards.append(tile(meta, a)); });
    parts.push(el("section", {}, el("h2", {text: "Top " + F.acts.length + " images"}),
      F.acts.length ? cards : el("p", {cls: "muted", text: "No image fired this feature."})));
    parts.push(el("section", {}, el("h2", {text: "Activation histogram"}), histogram(meta, F.hist)));
    if (F.labels.length) parts.push(el("section", {}, el("h2", {text: "Labels of the top images"}), bars(F.labels)));
    if (F.factors) {
      var fs = el("section", {}, el("h2", {text: "Generative factors of the top images"}));
      var grid = el("div", {cls: "factors"});
      Object.keys(F.factors).forEach(function (name) {
        var counts = F.factors[name], names = meta.factor_values[name] || [];
        var box = el("div", {"data-factor": name}, el("div", {cls: "muted", text: name}));
        if (counts.length <= 8) {
          box.append(bars(counts.map(function (n, v) { return [names[v] !== undefined ? names[v] : String(v), n]; })
            .filter(function (x) { return x[1] > 0; })));
        } else {
          box.append(columns(counts, names));
        }
        grid.append(box);
      });
      fs.append(grid);
      parts.push(fs);
    }
    if (F.nn.length) {
      var nn = el("div");
      F.nn.forEach(function (x) {
        nn.append(el("a", {cls: "pill", href: "#" + x[0], text: "#" + x[0] + " (" + fmt(x[1], 2) + ")"}));
      });
      parts.push(el("section", {}, el("h2", {text: "Nearest features (decoder cosine)"}), nn));
    }
    if (F.pos) {
      var tx = el("div");
      F.pos.forEach(function (x) { tx.append(el("span", {cls: "pill", text: x[0] + " " + fmt(x[1], 2)})); });
      var neg = el("div");
      F.neg.forEach(function (x) { neg.append(el("span", {cls: "pill", text: x[0] + " " + fmt(x[1], 2)})); });
      parts.push(el("section", {}, el("h2", {text: "Closest class names (decoder direction in text space)"}), tx,
        el("div", {cls: "muted", text: "farthest:"}), neg));
    }
    main.replaceChildren.apply(main, parts);
  }

  // ------------------------------------------------------------------ ground-truth page
  A.groundTruth = function () {
    var G = window.ATLAS_GROUND_TRUTH, meta = G.meta;
    document.body.append(header(meta, "Ground truth"));
    var main = el("main");
    main.append(el("p", {cls: "muted", text: G.description}));
    var ks = G.report.ks.map(String);
    var sumHead = el("tr", {}, el("th", {cls: "text", text: "factor"}), el("th", {text: "values"}),
      el("th", {text: "mean best AUROC"}));
    ks.forEach(function (k) { sumHead.append(el("th", {text: "probe k=" + k})); });
    sumHead.append(el("th", {text: "dominated features"}));
    var sumBody = el("tbody");
    Object.keys(G.report.factors).forEach(function (name) {
      var fac = G.report.factors[name];
      var tr = el("tr", {}, el("td", {cls: "text"}, el("a", {href: "#" + name, text: name})),
        el("td", {text: String(fac.values.length)}), el("td", {text: fmt(fac.mean_auroc)}));
      ks.forEach(function (k) { tr.append(el("td", {text: fmt(fac.mean_probe[k])})); });
      tr.append(el("td", {text: fmt(fac.dominance)}));
      sumBody.append(tr);
    });
    main.append(el("section", {}, el("h2", {text: "Summary (" + G.report.n_images + " images)"}),
      el("table", {id: "summary"}, el("thead", {}, sumHead), sumBody)));
    Object.keys(G.report.factors).forEach(function (name) {
      var fac = G.report.factors[name], names = G.value_names[name] || [];
      var probeKeys = Object.keys(fac.mean_probe);
      var sec = el("section", {"data-factor": name, id: name}, el("h2", {text: name}));
      sec.append(el("div", {cls: "stats"},
        el("span", {text: "mean best AUROC " + fmt(fac.mean_auroc)}),
        el("span", {text: "probe (balanced acc.) " + probeKeys.map(function (k) {
          return "k=" + k + ": " + fmt(fac.mean_probe[k]); }).join(", ")}),
        el("span", {text: "dominated features " + fmt(fac.dominance) + " (" + fac.n_dominated + " of " +
          fac.n_eligible + ")"})));
      var head = el("tr", {}, el("th", {cls: "text", text: "value"}), el("th", {text: "images"}),
        el("th", {text: "best feature"}), el("th", {text: "AUROC"}));
      probeKeys.forEach(function (k) { head.append(el("th", {text: "probe k=" + k})); });
      var tb = el("tbody");
      fac.values.forEach(function (v) {
        var name = names[v.value] !== undefined ? names[v.value] : String(v.value);
        var tr = el("tr", {}, el("td", {cls: "text", text: name}),
          el("td", {text: String(v.n_images)}),
          el("td", {}, v.best_feature >= 0 ? el("a", {href: "feature.html#" + v.best_feature,
            text: "#" + v.best_feature}) : "\u2013"),
          el("td", {cls: "auroc", text: fmt(v.auroc)}));
        probeKeys.forEach(function (k) { tr.append(el("td", {text: fmt(v.probe[k])})); });
        tb.append(tr);
      });
      sec.append(el("table", {}, el("thead", {}, head), tb));
      main.append(sec);
    });
    document.body.append(main);
    window.atlasReady = true;
  };
})();
"""

PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="assets/atlas.css">
</head>
<body>
<noscript>This page needs JavaScript (it runs offline; nothing is loaded from the network).</noscript>
{scripts}
</body>
</html>
"""
