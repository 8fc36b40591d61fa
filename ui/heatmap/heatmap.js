// seqsal heatmap: the prompt (and response) as running text coloured by saliency.
//
// Streamlit (st.components.v2) calls the default export with
//   { data, parentElement, setStateValue, setTriggerValue, key, name }
// every time `data` changes. `data` is the plain dict built by ui/heatmap/payload.py.
// Clicking a response segment sends the state "selection" = {indices, seq, side} back to Python:
// the selection the click makes, numbered (Python applies each number once; data.click_seq is
// the last it applied).
//
// Prompt and model text are untrusted: every string goes in through textContent or
// setAttribute, never through innerHTML.
//
// Stable hooks for browser tests:
//   root: data-testid="seqsal-heatmap" (+ class "seqsal-chips" in token-chip mode)
//   unit: span.seqsal-unit with data-part (prompt|target|foil), data-index, data-score;
//         selected response segments carry class "seqsal-selected"; whitespace-only response
//         segments carry class "seqsal-inert" (not focusable, not clickable, never outlined).
//   root data-render-ms: time to build and attach the view (ms); data-units: unit count.

const COLOR = /^#[0-9a-fA-F]{6}$/;
const LEADING_SPACE = /^[ \t\u00a0]*/;
const TRAILING_SPACE = /\s*$/;

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a < 1e-3 || a >= 1e4) return x.toExponential(2);
  return x.toFixed(4);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function safeColor(c, fallback) {
  return typeof c === "string" && COLOR.test(c) ? c : fallback;
}

function buildLegend(legend, whole, canSelect) {
  const box = el("div", "seqsal-legend");
  const name = el("span", "seqsal-legend-method", String(legend.method || ""));
  box.appendChild(name);
  const scale = el("span", "seqsal-legend-scale");
  const lo = el("span", "seqsal-legend-tick", fmt(legend.min));
  const bar = el("span", "seqsal-legend-bar");
  const stops = Array.isArray(legend.stops) ? legend.stops : [];
  if (stops.length >= 2) {
    const x0 = Number(stops[0][0]);
    const x1 = Number(stops[stops.length - 1][0]);
    const parts = stops.map(([x, c]) => {
      const pct = x1 === x0 ? 0 : ((Number(x) - x0) / (x1 - x0)) * 100;
      return `${safeColor(c, "#ffffff")} ${pct.toFixed(1)}%`;
    });
    bar.style.background = `linear-gradient(to right, ${parts.join(", ")})`;
  }
  const hi = el("span", "seqsal-legend-tick", (legend.signed ? "+" : "") + fmt(legend.max));
  scale.append(lo, bar, hi);
  box.appendChild(scale);
  const sign = legend.signed
    ? "red raises the target's probability, blue lowers it"
    : "darker = more salient";
  const key = el("span", "seqsal-legend-key", `${sign}; intensity ×${legend.intensity}`);
  box.appendChild(key);
  if (legend.rules) box.appendChild(el("span", "seqsal-legend-rules", String(legend.rules)));
  const sel = el("span", "seqsal-legend-sel");
  const swatch = el("span", whole ? "seqsal-swatch seqsal-swatch-whole" : "seqsal-swatch", "abc");
  sel.append(swatch);
  let hint = whole ? ` explained: the whole ${String(legend.target || "response")}` : " explained (selected)";
  if (canSelect) hint += " · click a response segment to explain it, shift-click to add";
  sel.append(document.createTextNode(hint));
  box.appendChild(sel);
  return box;
}

function buildUnits(data, frag, wanted, selected, whole) {
  const u = data.units;
  const n = u.text.length;
  let count = 0;
  let firstTarget = null;
  let marked = false;
  for (let i = 0; i < n; i += 1) {
    const part = u.part[i];
    if (!wanted(part)) continue;
    if (part === "target" && !marked) {
      marked = true;
      const mark = el("span", "seqsal-boundary");
      mark.title = "the response starts here";
      mark.setAttribute("aria-hidden", "true");
      frag.appendChild(mark);
    }
    const span = document.createElement("span");
    let cls = "seqsal-unit";
    if (u.special[i] || (Array.isArray(u.marker) && u.marker[i])) cls += " seqsal-special";
    const excluded = Array.isArray(u.excluded) && u.excluded[i];
    if (excluded) cls += " seqsal-excluded";
    if (part === "target") {
      if (selected.has(u.index[i])) cls += " seqsal-selected";
      else if (whole) cls += " seqsal-explained";
    }
    span.className = cls;
    span.setAttribute("data-part", part);
    span.setAttribute("data-index", String(u.index[i]));
    const score = u.score[i];
    span.setAttribute("data-score", score === null ? "" : String(score));
    span.style.backgroundColor = safeColor(u.color[i], "#ffffff");
    span.style.color = safeColor(u.fg[i], "#000000");
    span.title = `${part} ${u.index[i]} · score ${fmt(score)}` + (excluded ? " · left out of the colour range" : "");
    // A unit's leading spaces go in front of it, uncoloured: where a line wraps before the word
    // they hang at the end of the line, and coloured they would draw a bar there.
    const text = String(u.text[i]);
    const blank = !text.trim();
    const lead = blank ? "" : LEADING_SPACE.exec(text)[0];
    // A response unit's trailing whitespace (the newlines that end a sentence) goes after it,
    // uncoloured and not clickable: in the span it would stretch the selection's outline and the
    // click target onto the empty line below.
    const trail = blank || part !== "target" ? "" : TRAILING_SPACE.exec(text)[0];
    if (lead) frag.appendChild(document.createTextNode(lead));
    span.textContent = text.slice(lead.length, text.length - trail.length);
    // Blank lines (only whitespace with a newline) are not boxed in chip mode.
    if (/\n/.test(text) && blank) span.classList.add("seqsal-blank");
    if (part === "target" && blank) {
      // Whitespace only (a trailing newline of the response): nothing to see, so nothing to
      // click, focus or outline.
      span.classList.add("seqsal-inert");
    } else if (part === "target") {
      span.tabIndex = 0;
      span.setAttribute("role", "button");
      if (firstTarget === null) firstTarget = span;
    }
    frag.appendChild(span);
    if (trail) frag.appendChild(document.createTextNode(trail));
    count += 1;
  }
  return { count, firstTarget };
}

function markSelection(root, selection, whole) {
  const units = root.querySelectorAll('.seqsal-unit[data-part="target"]');
  for (const unit of units) {
    const on = selection.has(Number(unit.getAttribute("data-index")));
    unit.classList.toggle("seqsal-selected", on);
    unit.classList.toggle("seqsal-explained", whole && !on);
  }
}

function onActivate(root, unit, additive) {
  const state = root.seqsalState;
  if (!state || !state.data) return;
  if (unit.classList.contains("seqsal-inert")) return;
  const index = Number(unit.getAttribute("data-index"));
  // Optimistic: mark the new selection at once; Python answers with the new heatmap.
  const next = nextSelection(state.selection, index, additive);
  state.selection = next;
  markSelection(root, next, next.size === 0);
  root.classList.add("seqsal-busy");
  // The intended selection goes back as *state*, numbered: state persists in the page's widget
  // state and travels with every later rerun, so a click made while a run is in flight is applied
  // by the next run even if its own rerun request is coalesced away (a trigger could be lost).
  const seq = nextClickSeq(state, state.data.click_seq);
  state.pending = selectionState(next, seq, state.data.side);
  state.setStateValue("selection", state.pending);
}

function install(root) {
  root.addEventListener("mousedown", (ev) => {
    // Keep shift-click from selecting text.
    if (ev.shiftKey && ev.target.closest && ev.target.closest('.seqsal-unit[data-part="target"]')) {
      ev.preventDefault();
    }
  });
  root.addEventListener("click", (ev) => {
    const unit = ev.target.closest ? ev.target.closest('.seqsal-unit[data-part="target"]') : null;
    if (!unit || !root.contains(unit)) return;
    onActivate(root, unit, ev.shiftKey || ev.metaKey || ev.ctrlKey);
  });
  root.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" && ev.key !== " ") return;
    const unit = ev.target.closest ? ev.target.closest('.seqsal-unit[data-part="target"]') : null;
    if (!unit) return;
    ev.preventDefault();
    onActivate(root, unit, ev.shiftKey);
  });
}

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let root = parentElement.querySelector('[data-testid="seqsal-heatmap"]');
  if (!root) {
    root = el("div", "seqsal-root");
    root.setAttribute("data-testid", "seqsal-heatmap");
    parentElement.appendChild(root);
    root.seqsalState = {};
    install(root);
  }
  const state = root.seqsalState;
  if (!data || !data.units) {
    root.replaceChildren(el("div", "seqsal-empty", "No heatmap yet."));
    return undefined;
  }
  const t0 = performance.now();
  const oldBox = root.querySelector(".seqsal-text");
  const oldScroll = oldBox ? oldBox.scrollTop : 0;
  const sameText = state.data && state.data.text_key === data.text_key;
  state.data = data;
  state.setStateValue = setStateValue;
  // Data from a run that started before the last click (its click_seq is older) keeps showing
  // that click's selection, marked busy, until the run that applied it draws.
  const pending = state.pending && Number(data.click_seq || 0) < state.pending.seq ? state.pending : null;
  state.pending = pending;
  state.selection = new Set(pending ? pending.indices : data.selected || []);
  const whole = state.selection.size === 0;

  root.className = "seqsal-root";
  root.classList.toggle("seqsal-chips", Boolean(data.chips));
  root.classList.toggle("seqsal-compact", Boolean(data.compact));
  root.setAttribute("data-side", String(data.side || ""));
  root.classList.toggle("seqsal-busy", Boolean(pending));

  const frag = document.createDocumentFragment();
  frag.appendChild(buildLegend(data.legend || {}, whole, data.target_count > 0));
  const box = el("div", "seqsal-text");
  box.setAttribute("data-testid", "seqsal-text");
  const inner = document.createDocumentFragment();
  const main = buildUnits(data, inner, (p) => p !== "foil", state.selection, whole);
  box.appendChild(inner);
  frag.appendChild(box);
  let count = main.count;
  if (data.units.part.includes("foil")) {
    frag.appendChild(el("div", "seqsal-foil-label", "Foil (the alternative the target is contrasted with):"));
    const foilBox = el("div", "seqsal-text seqsal-foil");
    const foilFrag = document.createDocumentFragment();
    count += buildUnits(data, foilFrag, (p) => p === "foil", state.selection, whole).count;
    foilBox.appendChild(foilFrag);
    frag.appendChild(foilBox);
  }
  if (data.caption) frag.appendChild(el("div", "seqsal-caption", String(data.caption)));
  root.replaceChildren(frag);

  if (sameText) {
    box.scrollTop = oldScroll;
  } else if (main.firstTarget && box.scrollHeight > box.clientHeight) {
    // New text: show the response (it is where the user clicks).
    box.scrollTop = Math.max(0, main.firstTarget.offsetTop - box.clientHeight * 0.5);
  }
  const built = performance.now() - t0;
  root.setAttribute("data-units", String(count));
  root.setAttribute("data-render-ms", built.toFixed(1));
  requestAnimationFrame(() => {
    root.setAttribute("data-paint-ms", (performance.now() - t0).toFixed(1));
  });
  return undefined;
}
