// The click rule of every clickable view of the workbench (the heatmap's target segments, the
// matrix view's rows), the same as ui.state.apply_click in Python: a plain click selects just that
// segment (a click on the only selected one goes back to the whole target); shift/ctrl/cmd-click
// adds it, or removes it if it was selected. ui/heatmap/__init__.py puts this file in front of each
// component's own script.

function nextSelection(current, index, additive) {
  const next = new Set(current);
  if (additive) {
    if (next.has(index)) next.delete(index);
    else next.add(index);
  } else if (next.size === 1 && next.has(index)) {
    next.clear();
  } else {
    next.clear();
    next.add(index);
  }
  return next;
}

// The number of a click: larger than any this view sent before and than `floor` (the last one
// Python applied), so Python applies each click once, at its callback or at the next run.
function nextClickSeq(state, floor) {
  const seq = Math.max(Date.now(), (state.seq || 0) + 1, Number(floor || 0) + 1);
  state.seq = seq;
  return seq;
}

// What a click sends back as the component's "selection" state.
function selectionState(next, seq, side) {
  return { indices: [...next].sort((a, b) => a - b), seq, side };
}
