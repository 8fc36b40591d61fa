"""seqsal workbench: ``streamlit run ui/app.py`` (``seqsal up`` starts it with the servers).

Thin entry point: page set-up, layout and wiring. The servers' addresses come from
:class:`seqsal.settings.UISettings` (``SEQSAL_SALIENCY_ADDRESS``, ``SEQSAL_INFERENCE_ADDRESS``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # `streamlit run ui/app.py` puts ui/ first, not the repository
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from ui import clients, login, matrix, outage, saved_sessions, session, sxs, views  # noqa: E402
from ui.examples import baselines  # noqa: E402
from ui.state import to_query  # noqa: E402


def main() -> None:
    st.set_page_config(
        page_title="seqsal · sequence saliency",
        page_icon=":material/format_color_text:",
        layout="wide",
        initial_sidebar_state="expanded",
    )
    ss = st.session_state
    settings = clients.load_settings()
    login.require_login(settings)
    endpoints = clients.Endpoints.from_settings(settings)
    examples, example_problems = views.all_examples()
    notes = session.init_session(ss, st.query_params.to_dict(), examples)
    session.keep_widget_values(ss)
    for side in session.SIDES:
        # clicks whose callback did not run (made during a run): the heatmap's and the matrix's
        session.on_select(side)
        session.apply_numbered_click(side, matrix.clicked(side))
    report = clients.list_models(endpoints)

    views.sidebar(report, endpoints)
    with st.sidebar:
        saved_sessions.panel(report.default)
    views.header(report, notes, example_problems)
    outage.banner(report, endpoints)  # before the sides: after an outage they call again
    # Links are relative to the bundled examples only: an uploaded one is not there in a fresh
    # session, so a link to it carries its prompt and settings instead of its id.
    bundled = views.bundled_examples()[0]
    links = baselines(bundled)

    def query() -> dict[str, str]:
        return to_query(session.current_view(ss, report.default), links)

    view = session.current_view(ss, report.default)
    if view.pinned is None:
        left, right = st.columns([5, 7], gap="large")
        with left:
            views.editor(examples, pinned=False, default_model=report.default)
        with right:
            views.run_and_draw(
                "main",
                view.current,
                endpoints,
                view.display,
                title=views.side_title(view.current, examples),
                query_of=query,
                editable=True,
            )
        views.data_table(examples)  # the page's full width: a column leaves it ~325 px
    else:
        with st.expander("Datapoint editor (right side)", expanded=True, icon=":material/edit:"):
            views.editor(examples, pinned=True, default_model=report.default)
            views.data_table(examples)
        left, right = st.columns(2, gap="medium")
        with left:
            views.side_header("Pinned", view.pinned, examples, report)
            sxs.pinned_target_picker(view.pinned)
            pinned = views.run("pin", view.pinned, endpoints, view.display)
        with right:
            views.side_header("Current", view.current, examples, report)
            sxs.shared_scale_toggle()
            current = views.run("main", view.current, endpoints, view.display)
        sxs.share_scale([pinned, current], view.display)
        with left:
            views.draw(
                pinned,
                endpoints,
                display=view.display,
                title="pinned " + views.side_title(view.pinned, examples),
                query_of=query,
                editable=False,
            )
        with right:
            views.draw(
                current,
                endpoints,
                display=view.display,
                title=views.side_title(view.current, examples),
                query_of=query,
                editable=True,
            )
    session.sync_query_params(session.current_view(ss, report.default), bundled)


main()
