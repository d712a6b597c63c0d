"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const testsEl = document.getElementById("tests"), mainEl = document.getElementById("main");
const searchEl = document.getElementById("search"), countEl = document.getElementById("count");
const functions = [...new Set(DATA.methods.flatMap(m => m.functions))];
let chosen = null;
let func = DATA.function || (functions.includes("cosine") ? "cosine" : functions[0]);
const hidden = new Set();  // score directories the reader has unticked

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}
const flat = t => t.map(m => m[1]).join(" ");
const haystack = DATA.tests.map(t => (t.id + " " + flat(t.messages)).toLowerCase());

function showList() {
  const q = searchEl.value.trim().toLowerCase();
  const items = [];
  DATA.tests.forEach((t, i) => {
    if (q && !haystack[i].includes(q)) return;
    const li = el("li", {"data-test": t.id}, el("b", {}, t.id),
                  el("span", {}, (t.messages[0] || ["", ""])[1].slice(0, 120)));
    if (i === chosen) li.className = "active";
    li.onclick = () => choose(i);
    items.push(li);
  });
  testsEl.replaceChildren(...items);
  countEl.textContent = items.length + " of " + DATA.tests.length;
}

function conversation(turns) {
  return turns.map(([role, text]) =>
    el("div", {class: "turn " + role}, el("span", {class: "role"}, role), text));
}

function agreementTable(testId) {
  const rows = (DATA.agreement.rows || {})[testId] || [];
  if (!rows.length) return [];
  const head = el("tr", {}, ...["candidate", "function", ...DATA.agreement.metrics]
    .map(h => el("th", {}, h)));
  const cell = v => el("td", {}, v === null ? "-" : String(v));
  const body = rows.map(r => el("tr", {}, ...r.map(cell)));
  const title = "Agreement with the reference for this test example (" + rows.length + " rows)";
  return [el("details", {class: "agreement"}, el("summary", {}, title),
             el("table", {class: "agreement"}, head, ...body))];
}

function entries(method, lists, kind, source) {
  const ids = lists[kind + "_ids"], scores = lists[kind + "_scores"];
  return ids.map((id, r) => {
    const rank = kind === "top" ? r + 1 : method.n_train - r;
    const isSource = source !== null && source.split(", ").includes(id);
    const turns = DATA.train[id];
    const head = el("div", {class: "head"}, el("b", {}, "#" + rank), " \u00b7 " + func + " " +
                    scores[r].toPrecision(5) + " \u00b7 ", el("b", {}, id));
    if (isSource) head.append(el("span", {class: "badge"}, "source"));
    const details = el("details", {}, el("summary", {}, flat(turns)), ...conversation(turns));
    return el("div", {class: "entry" + (isSource ? " source" : ""), "data-train": id,
                      "data-rank": rank}, head, details);
  });
}

function column(method, i) {
  const lists = method.lists[i];
  const col = el("div", {class: "column", "data-method": method.label},
                 el("h3", {}, method.label), el("div", {class: "path"}, method.path));
  const lds = Object.entries(method.lds || {})
    .map(([f, v]) => "LDS " + v.toFixed(2) + " (" + f + ")");
  if (lds.length) col.append(el("div", {class: "lds"}, lds.join(" \u00b7 ")));
  if (!lists || !lists[func]) {
    col.append(el("p", {class: "hint"}, "not scored with " + func));
    return col;
  }
  const source = DATA.tests[i].source;
  col.append(el("div", {class: "kind"}, "Proponents (highest " + func + ")"),
             ...entries(method, lists[func], "top", source),
             el("div", {class: "kind"}, "Opponents (lowest " + func + ")"),
             ...entries(method, lists[func], "bottom", source));
  return col;
}

function show() {
  const t = DATA.tests[chosen];
  const buttons = functions.map(f => {
    const b = el("button", {class: f === func ? "on" : "", "data-function": f}, f);
    b.onclick = () => { func = f; show(); };
    return b;
  });
  const toggles = DATA.methods.map((m, k) => {
    const box = el("input", {type: "checkbox", "data-method": m.label});
    box.checked = !hidden.has(k);
    box.onchange = () => { box.checked ? hidden.delete(k) : hidden.add(k); show(); };
    return el("label", {}, box, " " + m.label);
  });
  const shown = DATA.methods.filter((m, k) => !hidden.has(k));
  mainEl.replaceChildren(
    el("h2", {id: "test-id"}, "Test example " + t.id),
    ...(t.source ? [el("p", {}, "Known source: ", el("b", {}, t.source))] : []),
    ...conversation(t.messages),
    ...agreementTable(t.id),
    el("h3", {}, "Train examples by score"),
    el("div", {class: "methods"}, ...toggles),
    el("div", {class: "functions"}, ...buttons),
    el("div", {class: "columns"}, ...shown.map(m => column(m, chosen))));
}

function choose(i) {
  chosen = i;
  history.replaceState(null, "", "#" + encodeURIComponent(DATA.tests[i].id));
  for (const li of testsEl.children)
    li.classList.toggle("active", li.dataset.test === DATA.tests[i].id);
  show();
}

searchEl.oninput = showList;
showList();
const fromHash = DATA.tests.findIndex(t => "#" + encodeURIComponent(t.id) === location.hash);
if (DATA.tests.length) choose(fromHash >= 0 ? fromHash : 0);
document.body.dataset.ready = "1";
document.body.dataset.readyMs = performance.now().toFixed(0);  // for bench/explanations_page.py
