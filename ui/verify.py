"""The verification panel beside a heatmap: can this explanation be trusted?

One click runs the server's ``Verify`` on exactly what the heatmap shows (prompt, target,
selection, method, granularity): the explanation's top-k segments are removed, and k random
ones for comparison, and the result is said in words ("removing the 3 most salient sentences
lowers log p(target) by 4.1 nats; 3 random sentences: 0.6 ± 0.3"). For any k the ablated prompt
is shown, the model's greedy answer to it generated on request, and a button keeps it as the
new prompt (a what-if edit).
"""

from __future__ import annotations

import streamlit as st

from seqsal.errors import SeqsalError
from seqsal.v1 import saliency_pb2
from seqsal.verification import describe_step, describe_sufficiency
from ui import clients, targets
from ui.side_loop import SideResult
from ui.state import method_enum

#: session keys: the latest Verify result per side, and the answer generated for an ablated prompt
RESULT_KEY = "v_verify_{side}"
ANSWER_KEY = "v_verify_answer_{side}"


def _request_key(result: SideResult) -> str:
    assert result.response is not None
    side = result.state
    return "|".join(
        [
            targets.request_key(_problem(result)),
            side.method,
            result.granularity,
            ",".join("1" if b else "0" for b in result.response.target_mask),
        ]
    )


def _problem(result: SideResult) -> saliency_pb2.SaliencyRequest:
    """The SaliencyRequest of what the heatmap shows, with its one method."""
    assert result.spec is not None and result.response is not None
    mask = list(result.response.target_mask)
    request = targets.saliency_request(
        result.spec, result.state, granularity=result.granularity, target_mask=mask
    )
    del request.problem.methods[:]
    request.problem.methods.append(method_enum(result.state.method))
    return request


def run_verify(result: SideResult, endpoints: clients.Endpoints) -> None:
    """Call Verify for the side's view and keep the result (or the error) in the session."""
    from seqsal.client import verify_request

    key = _request_key(result)
    request = verify_request(problem=_problem(result))
    try:
        response = clients.guard(
            "saliency", endpoints, lambda: clients.POOL.saliency(endpoints).verify(request)
        )
        st.session_state[RESULT_KEY.format(side=result.side)] = (key, response, None)
    except SeqsalError as exc:
        message = clients.describe_error(exc, "saliency", endpoints.saliency)
        st.session_state[RESULT_KEY.format(side=result.side)] = (key, None, message)
    st.session_state.pop(ANSWER_KEY.format(side=result.side), None)


def _generate(side: str, endpoints: clients.Endpoints, prompt: str, model: str, max_tokens: int) -> None:
    try:
        answer = clients.guard(
            "inference",
            endpoints,
            lambda: clients.POOL.inference(endpoints).generate(
                prompt=prompt, model=model, max_tokens=max_tokens, temperature=0.0
            ),
        )
        st.session_state[ANSWER_KEY.format(side=side)] = (prompt, answer.candidates[0].text, None)
    except SeqsalError as exc:
        message = clients.describe_error(exc, "inference", endpoints.inference)
        st.session_state[ANSWER_KEY.format(side=side)] = (prompt, None, message)


def _keep(prompt: str) -> None:
    """A what-if edit kept: the ablated prompt becomes the prompt (before the editor draws)."""
    st.session_state["w_prompt"] = prompt


def panel(result: SideResult, endpoints: clients.Endpoints, *, editable: bool) -> None:
    """The panel under a side's heatmap (nothing when there is no heatmap)."""
    if result.response is None or result.spec is None or result.payload is None:
        return
    side = result.side
    with st.expander("Check this explanation (ablation test)", icon=":material/fact_check:"):
        st.caption(
            "Removes the most salient segments of the prompt, and as many random ones, and re-scores the "
            "selected target: a faithful heatmap's top segments matter more than random ones."
        )
        key = _request_key(result)
        stored = st.session_state.get(RESULT_KEY.format(side=side))
        if stored is None or stored[0] != key:
            st.button(
                "Run the check",
                key=f"verify_run_{side}",
                icon=":material/play_arrow:",
                on_click=run_verify,
                args=(result, endpoints),
            )
            return
        _, response, error = stored
        if error is not None:
            st.error(error, icon=":material/error:")
            st.button("Retry", key=f"verify_retry_{side}", on_click=run_verify, args=(result, endpoints))
            return
        granularity = response.saliency.granularity
        if not response.steps:
            st.info(f"The prompt has {response.removable_segments} removable segment(s): nothing to compare.")
            return
        for step in response.steps:
            st.markdown(f"- {describe_step(step, granularity)}")
        st.caption(
            f"{describe_sufficiency(response.steps[-1], response.full_logprob, granularity)} · scored by "
            f"{response.scored_by} · {response.perturbations} prompts · {response.server_time_ms:.0f} ms"
        )
        ks = [s.k for s in response.steps]
        k = st.radio("Show the prompt without the top", ks, horizontal=True, key=f"verify_k_{side}")
        step = next(s for s in response.steps if s.k == k)
        st.code(step.ablated_prompt, language=None, wrap_lines=True)
        answer = st.session_state.get(ANSWER_KEY.format(side=side))
        st.button(
            "What does the model answer now?",
            key=f"verify_generate_{side}",
            icon=":material/smart_toy:",
            on_click=_generate,
            args=(side, endpoints, step.ablated_prompt, result.spec.model, result.state.max_new_tokens),
        )
        if answer is not None and answer[0] == step.ablated_prompt:
            if answer[2] is not None:
                st.error(answer[2], icon=":material/error:")
            else:
                st.markdown("**The model now answers:**")
                st.code(answer[1], language=None, wrap_lines=True)
        if editable and not result.state.chat_template:
            st.button(
                "Keep this as the new prompt",
                key=f"verify_keep_{side}",
                icon=":material/edit_note:",
                on_click=_keep,
                args=(step.ablated_prompt,),
            )
        elif editable:
            st.caption("The ablated prompt includes the chat template: copy what you want into the editor.")
