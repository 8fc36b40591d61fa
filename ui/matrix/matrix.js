// seqsal matrix view: target segments (rows) x prompt segments (columns), coloured by saliency.
//
// Streamlit (st.components.v2) calls the default export with { data, parentElement, setStateValue }.
// `data` is built by ui/matrix/__init__.py. A click on a row (a target segment) sets the state
// "selection" = {indices, seq, side}: the selection it makes, numbered as a heatmap click is.
// Texts are untrusted: they go in through textContent and setAttribute only.
//
// Stable hooks for browser tests: root data-testid="seqsal-matrix" (data-side, data-rows,
// data-ready); each row tr.seqsal-matrix-row with data-index (target segment) and class
// "seqsal-selected" when selected, "seqsal-pending" when not precomputed yet, "seqsal-inert" when
// its segment is whitespace only (not clickable).

const COLOR = /^#[0-9a-fA-F]{6}$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
  return x.toFixed(4);
}

function build(root, data) {
  const table = el("table", "seqsal-matrix-table");
  const head = el("tr");
  head.appendChild(el("th", "seqsal-matrix-corner", "response ↓ · prompt →"));
  for (const col of data.columns) {
    const th = el("th", col.excluded ? "seqsal-matrix-col seqsal-excluded" : "seqsal-matrix-col");
    th.appendChild(el("span", "seqsal-matrix-collabel", String(col.text)));
    th.setAttribute("title", String(col.title));
    head.appendChild(th);
  }
  const thead = el("thead");
  thead.appendChild(head);
  table.appendChild(thead);
  const body = el("tbody");
  const selected = new Set(data.selected || []);
  for (const row of data.rows) {
    const tr = el("tr", "seqsal-matrix-row");
    tr.setAttribute("data-index", String(row.index));
    if (row.inert) tr.classList.add("seqsal-inert");
    else tr.setAttribute("tabindex", "0");
    tr.classList.toggle("seqsal-selected", selected.has(row.index));
    tr.classList.toggle("seqsal-pending", !row.ready);
    const label = el("th", "seqsal-matrix-rowlabel", String(row.text));
    label.setAttribute("title", `${row.title}\nclick: explain this segment; shift-click: add it`);
    tr.appendChild(label);
    if (row.ready) {
      row.colors.forEach((c, i) => {
        const td = el("td", "seqsal-matrix-cell");
        td.style.background = COLOR.test(c) ? c : "#ffffff";
        td.setAttribute("title", `${data.columns[i].title}\nscore ${fmt(row.scores[i])}`);
        tr.appendChild(td);
      });
    } else {
      const td = el("td", "seqsal-matrix-wait", "not precomputed yet");
      td.colSpan = data.columns.length;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  table.appendChild(body);
  return table;
}

function activate(root, tr, additive) {
  const state = root.seqsalState;
  if (!state || !state.data || tr.classList.contains("seqsal-inert")) return;
  const index = Number(tr.getAttribute("data-index"));
  // the selection this click makes (ui/heatmap/selection.js: the heatmap's rule), numbered as the
  // heatmap's clicks are, so Python applies it once even when it lands during a run
  const next = nextSelection(state.data.selected || [], index, additive);
  const seq = nextClickSeq(state, state.data.click_seq);
  root.classList.add("seqsal-busy");
  state.setStateValue("selection", selectionState(next, seq, state.data.for_side));
}

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let root = parentElement.querySelector('[data-testid="seqsal-matrix"]');
  if (!root) {
    root = el("div", "seqsal-matrix");
    root.setAttribute("data-testid", "seqsal-matrix");
    parentElement.appendChild(root);
    root.seqsalState = {};
    root.addEventListener("click", (ev) => {
      const tr = ev.target.closest ? ev.target.closest("tr.seqsal-matrix-row") : null;
      if (tr && root.contains(tr)) activate(root, tr, ev.shiftKey || ev.metaKey || ev.ctrlKey);
    });
    root.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" && ev.key !== " ") return;
      const tr = ev.target.closest ? ev.target.closest("tr.seqsal-matrix-row") : null;
      if (!tr) return;
      ev.preventDefault();
      activate(root, tr, ev.shiftKey);
    });
  }
  root.seqsalState.data = data;
  root.seqsalState.setStateValue = setStateValue;
  root.classList.remove("seqsal-busy");
  if (!data || !data.rows) {
    root.replaceChildren(el("div", "seqsal-matrix-empty", "No matrix yet."));
    return undefined;
  }
  root.setAttribute("data-side", String(data.for_side || ""));
  root.setAttribute("data-rows", String(data.rows.length));
  root.setAttribute("data-ready", String(data.ready));
  const box = el("div", "seqsal-matrix-scroll");
  box.appendChild(build(root, data));
  const legend = el(
    "div",
    "seqsal-matrix-legend",
    `One colour range for the whole matrix: ${data.signed ? "±" : ""}${fmt(data.max)} is the darkest. ` +
      "Click a row to explain that response segment."
  );
  root.replaceChildren(legend, box);
  return undefined;
}
