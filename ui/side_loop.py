"""One side's loop: generate, explain the whole target, prefetch every segment, explain the selection.

Results are kept in the session (a generation per side, a small LRU of saliency responses),
so display-only changes (intensity, chips, density, method between the two gradient methods)
never call a server. A failed call is not retried on every rerun: its message stays up with a
retry button until the request changes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from seqsal.errors import InvalidArgumentError, SeqsalError
from seqsal.scale import ScaleRules
from seqsal.segmentation import segment_target_masks, segments_overlapping, validate_regex
from seqsal.v1 import common_pb2, saliency_pb2
from ui import clients, generation, prefetch, queue_status, targets
from ui.clients import Endpoints, TargetProblem
from ui.generation import Generation
from ui.heatmap import build_payload
from ui.session import click_seq_key, clicks_key, force_key, generation_key, selection_key
from ui.state import DisplayState, SideState
from ui.targets import TargetSpec

SESSION_CACHE = "v_saliency_cache"


@dataclass
class SideResult:
    """Everything one side shows."""

    side: str
    state: SideState
    generation: Generation | None = None
    generation_error: str | None = None
    spec: TargetSpec | None = None
    #: The granularity actually used (TOKENS when the custom regex is invalid).
    granularity: str = ""
    regex_error: str | None = None
    base: saliency_pb2.SaliencyResponse | None = None
    response: saliency_pb2.SaliencyResponse | None = None
    method_index: int = 0
    #: The selection the heatmap explains (empty = the whole target).
    selection: tuple[int, ...] = ()
    #: The selection the user asked for when it could not be explained (the heatmap then shows
    #: the whole target, and says so): a result on screen is always the one its label names.
    unexplained: tuple[int, ...] = ()
    target_segments: list[common_pb2.Segment] = field(default_factory=list)
    #: Plain words: why there is no heatmap (or why it is stale).
    problem: str | None = None
    #: True when ``problem`` came from a failed call that a retry might fix.
    retryable: bool = False
    prefetch_key: str | None = None
    payload: dict[str, Any] | None = None
    #: The scale rules the payload was built on (the display's, or a range shared by both sides).
    rules: ScaleRules | None = None
    caption: str = ""


def effective_granularity(side: SideState) -> tuple[str, str | None]:
    """The granularity to use and, for an invalid custom regex, why it fell back to tokens."""
    if side.granularity != "CUSTOM_REGEX":
        return side.granularity, None
    try:
        validate_regex(side.regex)
    except InvalidArgumentError as exc:
        return "TOKENS", exc.message
    return side.granularity, None


#: Integrated gradients' completeness check: warn when the residual |sum_i IG_i - (L(x) - L(baseline))|
#: is more than this fraction of the attributions' total |score| (sum_i |IG_i|): then the scores do
#: not add up to the change they should explain, and more steps are needed.
IG_RESIDUAL_WARN_FRACTION = 0.1


def ig_residual_warning(response: saliency_pb2.SaliencyResponse, method_index: int) -> str | None:
    """Plain words when an integrated-gradients result fails its completeness check (else ``None``)."""
    if not 0 <= method_index < len(response.scores):
        return None
    ms = response.scores[method_index]
    if not ms.HasField("completeness_residual"):
        return None
    residual = abs(ms.completeness_residual)
    total = sum(abs(x) for x in ms.scores)
    if residual <= IG_RESIDUAL_WARN_FRACTION * total:
        return None
    largest = max((abs(x) for x in ms.scores), default=0.0)
    share = f"{residual / total:.0%} of" if total > 0 else "more than"
    return (
        f"Integrated gradients did not converge: its scores should add up to the change in log p from "
        f"the baseline, but miss it by {residual:.3g} ({share} their total |score|; the largest score is "
        f"{largest:.3g}), after {ms.ig_steps} steps. Read the colours as rough: more steps "
        f"(`SEQSAL_IG_STEPS` on the saliency server) or a gradient method give a sounder picture. "
        f"(Warned above {IG_RESIDUAL_WARN_FRACTION:.0%}.)"
    )


def _cache() -> targets.ResponseCache:
    cache = st.session_state.get(SESSION_CACHE)
    if not isinstance(cache, targets.ResponseCache):
        cache = targets.ResponseCache()
        st.session_state[SESSION_CACHE] = cache
    return cache


def _session_prefix() -> str:
    ctx = get_script_run_ctx(suppress_warning=True)
    return f"{ctx.session_id if ctx else 'local'}:"


def _owner(side: str) -> str:
    return _session_prefix() + side


def _session_alive(owner: str) -> bool:
    """Whether the browser session behind a prefetch owner is still connected."""
    try:
        from streamlit.runtime import Runtime

        return bool(Runtime.instance().is_active_session(owner.split(":", 1)[0]))
    except Exception:  # no runtime (bare mode): keep it
        return True


def _selection_context(spec: TargetSpec, granularity: str, regex: str) -> str:
    payload = json.dumps(
        [spec.target_text, list(spec.target_token_ids), spec.foil, spec.model, granularity, regex]
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _saliency(
    name: str,
    endpoints: Endpoints,
    request: saliency_pb2.SaliencyRequest,
    what: str,
    *,
    prefetched: saliency_pb2.SaliencyResponse | None = None,
    request_id: str | None = None,
) -> tuple[saliency_pb2.SaliencyResponse | None, str | None]:
    """A response from the session cache, the prefetch stream, or the server; (None, message) on failure.

    The server schedules: this call is interactive and goes before any precompute (this
    session's or another user's), which resumes by itself afterwards.
    """
    key = targets.request_key(request)
    cache = _cache()
    hit = cache.get(key)
    if hit is not None:
        return hit, None
    if prefetched is not None:
        answer = saliency_pb2.SaliencyResponse()
        answer.CopyFrom(prefetched)
        answer.cache_hit = True  # computed earlier by the precompute, not for this click
        cache.put(key, answer)
        return answer, None
    failed_key = f"v_sal_err_{name}"
    failed = st.session_state.get(failed_key)
    if isinstance(failed, tuple) and failed[0] == key:
        return None, failed[1]
    try:
        ig = list(request.problem.methods) == [common_pb2.INTEGRATED_GRADIENTS]
        detail = _ig_progress(request) if ig else None
        response = queue_status.saliency(endpoints, request, request_id, what, detail=detail)  # shown
        if ig:
            _learn_ig_rate(request, response)
    except SeqsalError as exc:
        message = clients.describe_error(exc, "saliency", endpoints.saliency)
        st.session_state[failed_key] = (key, message)
        return None, message
    st.session_state.pop(failed_key, None)
    cache.put(key, response)
    return response, None


IG_RATE = "v_ig_ms_per_step_char"


def _ig_size(request: saliency_pb2.SaliencyRequest) -> int:
    """A size for the time estimate of an integrated-gradients call (chars, ~4 per token id)."""
    p = request.problem
    return max(1, len(p.prompt) + 4 * len(p.prompt_token_ids) + len(p.target) + 4 * len(p.target_token_ids))


def _ig_steps(request: saliency_pb2.SaliencyRequest) -> int:
    return request.problem.ig_steps or clients.load_settings().ig_steps


def ig_estimate_s(size: int, steps: int, rate: float | None) -> float | None:
    """The rule of the estimate: the last IG call's ms per step and size unit (``rate``, see
    :func:`_learn_ig_rate`) times this call's steps and size, in seconds (``None`` without a rate)."""
    return rate * steps * size / 1000 if rate else None


def ig_progress_words(size: int, steps: int, rate: float | None, elapsed_s: float) -> str:
    """The status line of an integrated-gradients call of ``size`` (:func:`_ig_size`) and ``steps``
    steps, ``elapsed_s`` seconds in, with the estimate from ``rate`` when there is one."""
    text = f"Integrated gradients: {steps} steps, each a forward and a backward pass · {elapsed_s:.0f} s"
    estimate_s = ig_estimate_s(size, steps, rate)
    if estimate_s:
        text += f" of about {estimate_s:.0f} s (estimated from your last IG call)"
    return text


def _ig_progress(
    request: saliency_pb2.SaliencyRequest, clock: Callable[[], float] = time.monotonic
) -> Callable[[], str]:
    """Words on the long integrated-gradients call, for its status line: its steps, the time so far
    and an estimate from this session's previous IG call (the server reports no IG steps)."""
    steps, size, started = _ig_steps(request), _ig_size(request), clock()
    rate = st.session_state.get(IG_RATE)
    rate = rate if isinstance(rate, float) else None
    return lambda: ig_progress_words(size, steps, rate, clock() - started)


def _learn_ig_rate(request: saliency_pb2.SaliencyRequest, response: saliency_pb2.SaliencyResponse) -> None:
    """Remember how long an IG call took per step and size (the next one's estimate)."""
    if not response.cache_hit and response.server_time_ms > 0:
        st.session_state[IG_RATE] = float(response.server_time_ms) / (_ig_steps(request) * _ig_size(request))


def _generation(
    name: str,
    side: SideState,
    endpoints: Endpoints,
    box: DeltaGenerator,
) -> tuple[Generation | None, str | None]:
    ss = st.session_state
    wanted = side.generation_key()
    current = ss.get(generation_key(name))
    force = bool(ss.pop(force_key(name), False))
    if isinstance(current, Generation) and current.key == wanted and not force:
        return current, None
    failed_key = f"v_gen_err_{name}"
    failed = ss.get(failed_key)
    if not force and isinstance(failed, tuple) and failed[0] == wanted:
        return None, failed[1]
    model = side.model or "the default model"
    with box.status(f"Generating with {model}…", expanded=True) as status:
        preview = st.empty()

        def on_update(texts: dict[int, str]) -> None:
            preview.code(
                "\n\n".join(f"[{i + 1}] {t}" for i, t in sorted(texts.items())) or "…", language=None
            )

        try:
            answer = generation.generate(endpoints, side, on_update, reuse=not force)
        except SeqsalError as exc:
            message = clients.describe_error(exc, "inference", endpoints.inference)
            status.update(label="Generation failed", state="error", expanded=False)
            preview.empty()
            ss[failed_key] = (wanted, message)
            ss.pop(generation_key(name), None)
            return None, message
        except TargetProblem as exc:
            status.update(label="Nothing to generate", state="error", expanded=False)
            preview.empty()
            return None, str(exc)
        tokens = sum(len(c.token_ids) for c in answer.candidates)
        label = (
            f"Reused a response of {tokens} tokens that {answer.model} generated earlier"
            if answer.reused
            else f"Generated {tokens} tokens with {answer.model} in {answer.elapsed_s:.1f} s"
        )
        status.update(
            label=label,
            state="complete",
            expanded=False,
        )
    ss.pop(failed_key, None)
    ss[generation_key(name)] = answer
    return answer, None


def prefetch_key(name: str) -> str:
    """Session key of a side's current prefetch job key (``None`` when there is none)."""
    return f"v_prefetch_{name}"


def _failure_keys(name: str) -> tuple[str, str]:
    return f"v_sal_err_{name}", f"v_gen_err_{name}"


def forget_failures(name: str) -> None:
    """Forget failed calls of a side, so the next run makes them again (after an outage)."""
    for key in _failure_keys(name):
        st.session_state.pop(key, None)


def clear_failures(name: str) -> None:
    """Forget failed calls of a side so the next run tries again (the Retry button)."""
    for key in _failure_keys(name):
        st.session_state.pop(key, None)
    st.session_state[force_key(name)] = True


def run_side(
    name: str,
    side: SideState,
    endpoints: Endpoints,
    display: DisplayState,
    *,
    status_box: DeltaGenerator,
    caption: Callable[[SideResult], str] | None = None,
) -> SideResult:
    """Run the loop for one side (calls the servers only for what is not cached yet).

    A reference target (without the chat template, which the inference server applies) is
    explained before the response is generated: its heatmap needs no generation.
    """
    result = SideResult(side=name, state=side)
    first = targets.needs_generation(side)
    if first:
        result.generation, result.generation_error = _generation(name, side, endpoints, status_box)
    _explain(result, endpoints, display, caption)
    if not first:
        result.generation, result.generation_error = _generation(name, side, endpoints, status_box)
    return result


def _explain(
    result: SideResult,
    endpoints: Endpoints,
    display: DisplayState,
    caption: Callable[[SideResult], str] | None,
) -> None:
    """The saliency part of :func:`run_side`: the whole target, the prefetch, the selection."""
    name, side, ss = result.side, result.state, st.session_state
    try:
        spec = targets.target_spec(side, result.generation)
    except TargetProblem as exc:
        result.problem = result.generation_error or str(exc)
        result.retryable = result.generation_error is not None
        return
    result.spec = spec
    result.granularity, result.regex_error = effective_granularity(side)
    regex = side.regex if result.granularity == "CUSTOM_REGEX" else ""

    base_request = targets.saliency_request(spec, side, granularity=result.granularity)
    request_id = result.generation.request_id if result.generation else None
    base, problem = _saliency(name, endpoints, base_request, f"the {spec.label}", request_id=request_id)
    if base is None:
        result.problem, result.retryable = problem, True
        return
    result.base = base
    masks = segment_target_masks(list(base.tokens), list(base.segments))
    result.target_segments = [segment for segment, _ in masks]

    # A selection belongs to one target: at another granularity (or after a prompt edit that left
    # the target as it was) it is carried over by char span; a new target clears it.
    context = _selection_context(spec, result.granularity, regex)
    ctx_key, spans_key = f"sel_ctx_{name}", f"sel_spans_{name}"
    target_key = _selection_context(spec, "", "")
    selection = tuple(ss.get(selection_key(name), ()))
    if ss.get(ctx_key) not in (None, context):
        previous = ss.get(spans_key)
        same_target = isinstance(previous, tuple) and previous[0] == target_key
        selection = tuple(segments_overlapping(result.target_segments, previous[1])) if same_target else ()
    ss[ctx_key] = context
    # whitespace-only segments (a response's trailing newline) are not selectable from anywhere:
    # a click on them is ignored by the heatmap and the matrix, and a link's sel= drops them
    selection = tuple(i for i in selection if 0 <= i < len(masks) and masks[i][0].text.strip())
    ss[selection_key(name)] = selection
    spans = [(masks[i][0].char_start, masks[i][0].char_end) for i in selection]
    ss[spans_key] = (target_key, spans)
    result.selection = selection

    # Fill the server's cache with every segment, in the background.
    ig = side.method == "INTEGRATED_GRADIENTS"
    if len(masks) > 1 and not (ig and len(masks) > prefetch.MAX_IG_PREFETCH_SEGMENTS):
        prefetch.PREFETCHER.sweep(_session_alive)  # closed tabs' prefetches stop
        background = targets.all_segments_request(base_request)
        result.prefetch_key = prefetch.PREFETCHER.start(_owner(name), endpoints, background)
    ss[prefetch_key(name)] = result.prefetch_key

    response = base
    if selection:
        mask = [any(masks[i][1][t] for i in selection) for t in range(len(masks[0][1]))]
        request = targets.saliency_request(spec, side, granularity=result.granularity, target_mask=mask)
        what = "the selected segment" + ("s" if len(selection) > 1 else "")
        # A single segment the prefetch stream has returned is answered from what it returned.
        prefetched = None
        if len(selection) == 1 and result.prefetch_key:
            prefetched = prefetch.PREFETCHER.response(result.prefetch_key, selection[0])
            if prefetched is not None and list(prefetched.target_mask) != mask:
                prefetched = None  # not the same selection (never expected): ask the server
        selected, problem = _saliency(
            name, endpoints, request, what, prefetched=prefetched, request_id=request_id
        )
        if selected is None:
            result.problem, result.retryable = problem, True
            result.unexplained, result.selection = selection, ()
        else:
            response = selected
    result.response = response
    result.method_index = targets.method_index(response, side.method)
    result.caption = caption(result) if caption else ""
    set_payload(result, display, display.rules_for(side))
    return result


def set_payload(result: SideResult, display: DisplayState, rules: ScaleRules) -> None:
    """(Re)build a side's heatmap data on ``rules`` (e.g. a colour range shared by both sides)."""
    if result.response is None:
        return
    result.rules = rules
    result.payload = build_payload(
        result.response,
        result.method_index,
        side=result.side,
        selection=result.selection,
        intensity=display.intensity,
        chips=display.chips,
        compact=display.compact,
        caption=result.caption,
        rules=rules,
        clicks=int(st.session_state.get(clicks_key(result.side), 0)),
        click_seq=int(st.session_state.get(click_seq_key(result.side), 0)),
        target_label=result.spec.label if result.spec else "response",
    )
