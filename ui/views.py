"""What the page draws: sidebar controls, datapoint editor, data table, response and heatmap panels.

Untrusted text (prompts, responses, uploaded examples) never goes into Markdown unescaped:
it is shown through :func:`md_escape`, ``st.code`` or the heatmap component (text nodes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import pandas as pd
import streamlit as st

from seqsal.scale import AGGREGATES
from ui import export, heatmap, matrix, outage, queue_status, session, side_loop, targets, verify
from ui.clients import Endpoints, ModelsReport
from ui.examples import Example, decode_upload, load_examples
from ui.prefetch import PREFETCHER
from ui.side_loop import SideResult
from ui.state import (
    GRANULARITIES,
    GRANULARITY_LABELS,
    MAX_CANDIDATES,
    MAX_NEW_TOKENS_LIMIT,
    METHOD_LABELS,
    METHODS,
    TARGET_KIND_LABELS,
    TARGET_KINDS,
    DisplayState,
    SideState,
)

UPLOADED = "v_uploaded_examples"
UPLOAD_PROBLEMS = "v_upload_problems"
INTENSITIES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Colour-range choices: the largest |score|, or a percentile of them (seqsal.scale).
CLIPS: tuple[float, ...] = (session.CLIP_LARGEST, 99.0, 95.0, 90.0)

_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")


def md_escape(text: str) -> str:
    """Text that Markdown shows literally (every ASCII punctuation char backslash-escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def shorten(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# --------------------------------------------------------------------------- examples


@st.cache_data(show_spinner=False)
def _bundled(mtime: float) -> tuple[list[Example], list[str]]:
    return load_examples()


def bundled_examples() -> tuple[list[Example], list[str]]:
    """The examples file (re-read when it changes)."""
    from ui.examples import EXAMPLES_PATH

    try:
        mtime = EXAMPLES_PATH.stat().st_mtime
    except OSError:
        mtime = 0.0
    return _bundled(mtime)


def all_examples() -> tuple[list[Example], list[str]]:
    """Bundled and uploaded examples, and the problems of the bundled file."""
    bundled, problems = bundled_examples()
    return [*bundled, *st.session_state.get(UPLOADED, [])], problems


def _on_upload() -> None:
    ss = st.session_state
    upload = ss.get("w_upload")
    if upload is None:
        return
    known = [e.id for e in all_examples()[0]]
    added, problems = decode_upload(upload.getvalue(), upload.name, known)
    ss[UPLOADED] = [*ss.get(UPLOADED, []), *added]
    ss[UPLOAD_PROBLEMS] = (upload.name, len(added), problems)


def _on_pick(examples: list[Example]) -> None:
    chosen = st.session_state.get(session.EXAMPLE_PICK)
    if not chosen:
        session.load_own_prompt()
        return
    for example in examples:
        if example.id == chosen:
            session.load_example(example)
            return


def _on_table_select(examples: list[Example]) -> None:
    state = st.session_state.get("w_table") or {}
    rows = (state.get("selection") or {}).get("rows") or []
    if rows and 0 <= rows[0] < len(examples):
        session.load_example(examples[rows[0]])


# --------------------------------------------------------------------------- header and sidebar


def header(report: ModelsReport, notes: list[str], example_problems: list[str]) -> None:
    st.markdown("### seqsal · Sequence Saliency")
    st.caption(
        "Write or pick a prompt, let the model answer, then click part of the answer: the heatmap "
        "shows which parts of the prompt made the model produce it (darker = more salient)."
    )
    for problem in report.problems.values():
        st.error(problem, icon=":material/cloud_off:")
    for note in notes:
        st.info(f"From the link: {md_escape(note)}", icon=":material/link:")
    if example_problems:
        with st.expander(f"{len(example_problems)} example line(s) skipped", icon=":material/warning:"):
            for problem in example_problems:
                st.markdown(f"- {md_escape(problem)}")


def sidebar(report: ModelsReport, endpoints: Endpoints) -> None:
    ss = st.session_state
    with st.sidebar:
        st.subheader("Model")
        if len(report.ids) > 1:
            if ss.get(session.W["model"]) not in report.ids:
                ss[session.W["model"]] = report.default
            st.selectbox("Model", report.ids, key=session.W["model"], help="Models both servers host.")
        elif report.ids:
            st.caption(f"Model: `{report.default}`")
        info = report.infos.get(ss.get(session.W["model"]) or report.default)
        if info is not None:
            st.caption(
                f"{info.architecture} · {info.dtype} on {info.device} · up to {info.max_tokens} tokens"
            )
        st.toggle(
            "Chat template",
            key=session.W["chat_template"],
            help="Wrap the prompt as a user turn in the model's chat template. The heatmap then shows "
            "the templated prompt exactly as the model saw it.",
        )
        with st.expander("Generation", icon=":material/tune:"):
            st.number_input("Candidates (n)", 1, MAX_CANDIDATES, key=session.W["n"])
            st.number_input("Max new tokens", 1, MAX_NEW_TOKENS_LIMIT, key=session.W["max_new_tokens"])
            st.slider("Temperature", 0.0, 2.0, step=0.05, key=session.W["temperature"], help="0 = greedy.")
            st.number_input(
                "Seed", 0, 2**31 - 1, key=session.W["seed"], help="Used when sampling (temperature > 0)."
            )
            st.text_area(
                "Stop strings",
                key=session.W["stop"],
                height=68,
                help="One per line; write a newline as \\n and a tab as \\t.",
            )

        st.subheader("Saliency")
        st.radio(
            "Method",
            METHODS,
            format_func=lambda m: METHOD_LABELS[m],
            key=session.W["method"],
            help="GRAD_L2 is never negative (white → purple). Gradient · input and integrated gradients "
            "are signed (blue = lowers the target's probability, red = raises it). Occlusion and LIME "
            "re-score the prompt with segments removed (no gradients): a segment's score is the change "
            "in log p(target) it causes.",
        )
        st.selectbox(
            "Granularity",
            GRANULARITIES,
            format_func=lambda g: GRANULARITY_LABELS[g],
            key=session.W["granularity"],
            help="How tokens are grouped into segments, for the heatmap and for selecting.",
        )
        custom = ss.get(session.W["granularity"]) == "CUSTOM_REGEX"
        st.text_input(
            "Custom regex",
            key=session.W["regex"],
            disabled=not custom,
            placeholder=r"e.g. (?m)^\w+: or \*\*",
            help="A regular expression in RE2 syntax (no backreferences or lookaround; `\\w`, `\\d`, `\\b` "
            "are ASCII): a new segment starts at every match. The servers use the same engine.",
        )
        if custom and not str(ss.get(session.W["regex"]) or ""):
            st.info(
                "Type a regular expression: a segment starts at every match. The view shows tokens "
                "until then.",
                icon=":material/regular_expression:",
            )
        elif custom:
            _, problem = side_loop.effective_granularity(session.read_side(ss))
            if problem:
                st.error(md_escape(problem), icon=":material/error:")

        st.subheader("Display")
        if ss.get(session.D["intensity"]) not in INTENSITIES:
            ss[session.D["intensity"]] = min(
                INTENSITIES, key=lambda x: abs(x - float(ss[session.D["intensity"]]))
            )
        if ss.get(session.D["clip"]) not in CLIPS:
            ss[session.D["clip"]] = session.CLIP_LARGEST
        st.select_slider(
            "Colour intensity",
            INTENSITIES,
            key=session.D["intensity"],
            format_func=lambda x: f"×{x:g}",
            help="Higher saturates sooner: it brings out diffuse attributions.",
        )
        st.toggle("Token chips", key=session.D["chips"], help="Box every unit instead of running text.")
        st.toggle("Compact density", key=session.D["compact"], help="Smaller text for long prompts.")
        st.toggle(
            "Scale includes first & special tokens",
            key=session.D["scale_all"],
            help="Off (default): the first token of the sequence (an attention sink: its gradient is often "
            "the largest of the prompt) and special tokens are left out of the colour range and of their "
            "segment's score, drawn hatched with their value on hover.",
        )
        st.toggle(
            "Scale includes the chat template",
            key=session.D["template"],
            disabled=not ss.get(session.W["chat_template"]),
            help="With the chat template on: off leaves the template around your prompt (its roles and "
            "built-in system prompt) out of the colour range, drawn hatched. Its markers (<|im_start|>...) "
            "are always their own dimmed segments and count as special tokens.",
        )
        st.selectbox(
            "Colour range",
            CLIPS,
            format_func=lambda p: (
                "largest |score|" if p >= session.CLIP_LARGEST else f"{p:g}th percentile of |score|"
            ),
            key=session.D["clip"],
            help="A percentile keeps one outlier from washing out the rest (units beyond it saturate).",
        )
        st.radio(
            "Segment score",
            AGGREGATES,
            format_func=lambda a: {"sum": "sum over tokens", "mean": "mean over tokens"}[a],
            key=session.D["aggregate"],
            horizontal=True,
            help="Sum (the paper's choice) makes long segments look important; the mean does not.",
        )
        st.divider()
        st.caption(f"Inference: `{endpoints.inference}`  \nSaliency: `{endpoints.saliency}`")


# --------------------------------------------------------------------------- editor and data table


def editor(examples: list[Example], *, pinned: bool, default_model: str = "") -> None:
    """The datapoint editor of the current side."""
    ss = st.session_state
    ids = ["", *[e.id for e in examples]]
    titles = {e.id: e.title for e in examples}
    if ss.get(session.EXAMPLE_PICK) not in ids:
        ss[session.EXAMPLE_PICK] = ""
    st.selectbox(
        "Example",
        ids,
        format_func=lambda i: titles.get(i, "— your own prompt —"),
        key=session.EXAMPLE_PICK,
        on_change=_on_pick,
        args=(examples,),
    )
    current = next((e for e in examples if e.id == ss.get(session.EXAMPLE_ID)), None)
    if current is not None and current.description:
        edited = " (edited)" if ss.get(session.W["prompt"]) != current.prompt else ""
        st.caption(md_escape(current.description) + edited)
    st.text_area(
        "Prompt",
        key=session.W["prompt"],
        height=260 if pinned else 340,
        help="Editing regenerates the response and its saliency when you leave the box (or Ctrl+Enter).",
    )
    st.radio(
        "Explain",
        TARGET_KINDS,
        format_func=lambda k: TARGET_KIND_LABELS[k],
        key=session.W["target_kind"],
        horizontal=True,
        on_change=session.on_target_kind,
    )
    kind = ss.get(session.W["target_kind"])
    if kind == "reference":
        st.text_area("Reference target", key=session.W["reference"], height=90)
    elif kind == "foil":
        st.text_area(
            "Target (leave empty to use the generated response)", key=session.W["reference"], height=90
        )
        st.text_area(
            "Foil: why the target rather than this?",
            key=session.W["foil"],
            height=70,
            help="Contrastive explanation: L = log p(target) − log p(foil); only prompt tokens get scores. "
            "A clicked target segment is contrasted with the foil in its place (the target before it is "
            "the shared context and gets scores too).",
        )
    left, right = st.columns(2)
    with left:
        st.button(
            "Generate",
            icon=":material/play_arrow:",
            on_click=session.force_generation,
            args=("main",),
            width="stretch",
            help="Generate again (with sampling: the next seed).",
        )
    with right:
        if ss.get(session.PINNED) is None:
            st.button(
                "Pin for side-by-side",
                icon=":material/push_pin:",
                on_click=session.pin_current,
                args=(default_model,),
                width="stretch",
                help="Keep this prompt, target, model and settings on the left and compare with what you "
                "do next (another example, an edit, another model).",
            )
        else:
            st.button("Unpin", icon=":material/close:", on_click=session.unpin, width="stretch")


def data_table(examples: list[Example]) -> None:
    """The loaded examples as a table to pick from, and an upload of more.

    The panel keeps its identity (a key) when an upload changes the count in its label, and it
    opens after an upload so the per-line report shows.
    """
    report = st.session_state.get(UPLOAD_PROBLEMS)
    with st.expander(
        f"Data table · {len(examples)} examples",
        expanded=bool(report),
        key="data_table",
        icon=":material/table_rows:",
    ):
        frame = pd.DataFrame(
            [
                {
                    "id": e.id,
                    "title": e.title,
                    "granularity": e.granularity.lower() if e.granularity else "",
                    "reference target": shorten(e.target, 60),
                    "foil": shorten(e.foil, 40),
                    "prompt chars": len(e.prompt),
                    "source": e.source,
                }
                for e in examples
            ]
        )
        st.dataframe(
            frame,
            hide_index=True,
            on_select=lambda: _on_table_select(examples),
            selection_mode="single-row",
            key="w_table",
            width="stretch",
        )
        st.file_uploader(
            "Add examples from a JSONL file",
            type=["jsonl", "json", "txt"],
            key="w_upload",
            on_change=_on_upload,
            help='One JSON object per line: {"id", "title", "prompt"} and optionally "target", "foil", '
            '"granularity", "regex", "stop", "chat_template", "max_new_tokens", "description".',
        )
        if report:
            name, added, problems = report
            if added:
                st.success(
                    f"Added {added} example(s) from {md_escape(name)}. They live in this session only: "
                    "a link to one carries its prompt and settings instead of its id."
                )
            for problem in problems:
                st.warning(md_escape(problem))


# --------------------------------------------------------------------------- response and heatmap


def response_panel(result: SideResult, *, editable: bool) -> None:
    """The generated candidate(s)."""
    generation = result.generation
    if generation is None:
        return
    if editable and len(generation.candidates) > 1:
        st.radio(
            "Candidate",
            list(range(len(generation.candidates))),
            format_func=lambda i: f"{i + 1}",
            key=session.W["candidate"],
            horizontal=True,
        )
    index = min(result.state.candidate, len(generation.candidates) - 1) if generation.candidates else 0
    if not generation.candidates:
        return
    candidate = generation.candidates[index]
    finish = {"LENGTH": "stopped at max new tokens", "STOP": "finished"}.get(candidate.finish_reason, "")
    label = "Model response" + (
        f" {index + 1} of {len(generation.candidates)}" if len(generation.candidates) > 1 else ""
    )
    st.caption(f"{label} · {len(candidate.token_ids)} tokens · {finish}")
    st.code(candidate.text or "(empty)", language=None, wrap_lines=True)


def _explaining(result: SideResult) -> str:
    spec = result.spec
    if spec is None:
        return ""
    unit = GRANULARITY_LABELS.get(result.granularity, "").lower().rstrip("s") or "segment"
    count = len(result.target_segments)
    if result.selection:
        which = ", ".join(str(i + 1) for i in result.selection)
        plural = "s" if len(result.selection) > 1 else ""
        what = f"{unit}{plural} {which} of {count} of the {spec.label}"
    else:
        what = f"the whole {spec.label}"
    if spec.foil is not None:
        what += ", contrasted with the foil"
    if result.unexplained:
        which = ", ".join(str(i + 1) for i in result.unexplained)
        what += f" (the selected {unit} {which} could not be explained: see the message above)"
    return what


def _meta(result: SideResult) -> str:
    response = result.response
    if response is None:
        return ""
    parts = [
        f"`{response.model}`",
        result.state.method,
        GRANULARITY_LABELS.get(result.granularity, result.granularity).lower(),
        f"log p(selection) = {response.target_logprob:.3f}",
    ]
    if response.HasField("foil_logprob"):
        parts.append(f"log p(foil) = {response.foil_logprob:.3f}")
    ms = response.scores[result.method_index] if len(response.scores) > result.method_index else None
    if ms is not None and ms.HasField("completeness_residual"):
        parts.append(f"IG residual {ms.completeness_residual:.3g} ({ms.ig_steps} steps)")
    parts.append(f"{response.server_time_ms:.0f} ms" + (" (cache hit)" if response.cache_hit else ""))
    return " · ".join(parts)


def prefetch_panel(result: SideResult) -> None:
    """Progress of the background SaliencyAllSegments call (polls while it runs)."""
    key = result.prefetch_key
    if key is None:
        return
    first = PREFETCHER.progress(key)
    if first is None:
        return
    was_running = not first.finished

    @st.fragment(run_every=0.5 if was_running else None)
    def panel() -> None:
        p = PREFETCHER.progress(key)
        if p is None:
            return
        if p.error and outage.covers(p.error, st.session_state.get(outage.DOWN_KEY) or {}):
            pass  # the banner at the top says it
        elif p.error:
            st.caption(
                f":material/warning: Background precompute stopped: {p.error} Clicks compute on demand."
            )
        elif p.cancelled:
            st.caption("Background precompute cancelled (the view changed).")
        elif not p.finished:
            endpoints = PREFETCHER.endpoints(key)
            where = queue_status.precompute_words(endpoints, p.request_id) if endpoints else ""
            where = f" · {where}" if where else ""
            if p.total:
                text = f"Precomputing every segment in the background: {p.done} of {p.total} ready{where}"
                st.progress(min(1.0, p.done / p.total), text=text)
            else:
                st.progress(0.0, text=f"Precomputing every segment in the background…{where}")
        else:
            # a full bar, not a caption: the same element and height as while it ran, so the end
            # of the precompute moves nothing under it (a button moving mid-click loses the click)
            st.progress(
                1.0,
                text=f"All {p.total} segments precomputed in {p.elapsed_s:.1f} s: "
                "clicks are answered from the cache.",
            )
        if was_running and p.finished:
            st.rerun(scope="app")

    panel()


def heatmap_panel(
    result: SideResult,
    *,
    display: DisplayState,
    title: str,
    query: dict[str, str],
) -> None:
    """Heading, problems, the clickable heatmap, its progress and the export buttons."""
    if result.regex_error and result.state.regex:
        st.warning(
            "The custom regex is invalid (see the sidebar): showing tokens until it is fixed.",
            icon=":material/regular_expression:",
        )
    down = st.session_state.get(outage.DOWN_KEY) or {}  # the banner at the top says these
    if (
        result.generation_error
        and result.spec is not None
        and not outage.covers(result.generation_error, down)
    ):
        st.warning(result.generation_error, icon=":material/cloud_off:")
    if result.problem and not outage.covers(result.problem, down):
        st.error(result.problem, icon=":material/error:")
        if result.retryable:
            st.button(
                "Retry",
                key=f"retry_{result.side}",
                icon=":material/refresh:",
                on_click=side_loop.clear_failures,
                args=(result.side,),
            )
    if result.payload is None or result.response is None:
        return
    st.markdown(f"**Explaining** {_explaining(result)}")
    prefetch_panel(result)
    heatmap.mount(result.payload, side=result.side, on_select=lambda: session.on_select(result.side))
    st.caption(_meta(result))
    if (residual := side_loop.ig_residual_warning(result.response, result.method_index)) is not None:
        st.warning(residual, icon=":material/warning:")
    matrix_panel(result, display)
    generation = None
    if result.generation is not None:
        g = result.generation
        generation = {
            "model": g.model,
            "prompt": g.prompt,
            "candidates": [
                {"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in g.candidates
            ],
        }
    export.download_buttons(
        result.response,
        result.method_index,
        side=result.side,
        title=title,
        intensity=display.intensity,
        chips=display.chips,
        view=query,
        link=share_link(query),
        generation=generation,
        rules=result.rules or display.rules_for(result.state),
    )


def matrix_panel(result: SideResult, display: DisplayState) -> None:
    """Every response segment's saliency at once, from the precompute; a row click selects it."""
    key, count = result.prefetch_key, len(result.target_segments)
    if key is None or count < 2:
        return
    found = {i: r for i in range(count) if (r := PREFETCHER.response(key, i)) is not None}
    data = matrix.build_matrix(
        found,
        result.target_segments,
        lambda response: targets.method_index(response, result.state.method),
        side=result.side,
        selection=result.selection,
        intensity=display.intensity,
        rules=display.rules_for(result.state),
    )
    if data is None:
        return
    label = f"Matrix: {count} response segments × {len(data['columns'])} prompt segments"
    with st.expander(label + ("" if data["ready"] == count else f" ({data['ready']} ready)")):
        matrix.mount(
            data,
            side=result.side,
            on_select=lambda: session.apply_numbered_click(result.side, matrix.clicked(result.side)),
        )


def share_link(query: dict[str, str]) -> str:
    """This page's URL with the view's query."""
    url = st.context.url or ""
    if not url:
        return ""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def side_title(side: SideState, examples: list[Example]) -> str:
    example = next((e for e in examples if e.id == side.example_id), None)
    title = example.title if example else "Your prompt"
    if example and side.prompt != example.prompt:
        title += " (edited)"
    return title


def side_header(label: str, side: SideState, examples: list[Example], report: ModelsReport) -> None:
    model = side.model or report.default or "default model"
    st.markdown(f"#### {label}: {md_escape(side_title(side, examples))}")
    st.caption(
        f"`{model}` · {side.method} · {GRANULARITY_LABELS[side.granularity].lower()}"
        + (" · chat template" if side.chat_template else "")
    )


def run_and_draw(
    name: str,
    side: SideState,
    endpoints: Endpoints,
    display: DisplayState,
    *,
    title: str,
    query_of: Callable[[], dict[str, str]],
    editable: bool,
) -> SideResult:
    """Run one side's loop and draw its response and heatmap."""
    result = run(name, side, endpoints, display)
    draw(result, endpoints, display=display, title=title, query_of=query_of, editable=editable)
    return result


def run(name: str, side: SideState, endpoints: Endpoints, display: DisplayState) -> SideResult:
    """Run one side's loop (its progress shows where this is called)."""
    return side_loop.run_side(name, side, endpoints, display, status_box=st.container())


def draw(
    result: SideResult,
    endpoints: Endpoints,
    *,
    display: DisplayState,
    title: str,
    query_of: Callable[[], dict[str, str]],
    editable: bool,
) -> None:
    """Draw a side's response, heatmap and verification panel."""
    response_panel(result, editable=editable)
    heatmap_panel(result, display=display, title=title, query=query_of())
    verify.panel(result, endpoints, editable=editable)
