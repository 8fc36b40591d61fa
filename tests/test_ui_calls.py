"""The UI's service layer without a page: plain-words errors, targets, requests, caches."""

from __future__ import annotations

import pytest

from seqsal import errors
from seqsal.v1 import common_pb2, saliency_pb2
from ui import clients, generation, prefetch, targets
from ui.clients import TargetProblem
from ui.generation import CandidateText, Generation
from ui.state import SideState
from ui.targets import TargetSpec, target_spec

GEN = Generation(
    key="k",
    prompt="<|user|>\nHi\n<|assistant|>\n",
    prompt_token_ids=(1, 2),
    model="tiny",
    candidates=(
        CandidateText(0, " Hello", (7, 8), "STOP"),
        CandidateText(1, "", (), "STOP"),
    ),
    elapsed_s=0.1,
)


@pytest.mark.parametrize(
    ("error", "fragments"),
    [
        (
            errors.UnavailableError("connect failed"),
            ["not reachable", "`h:1`", "restarts a server that stops", "SEQSAL_SALIENCY_ADDRESS"],
        ),
        (errors.DeadlineExceededError("late"), ["took too long", "shorter prompt"]),
        (errors.ResourceExhaustedError("full"), ["busy", "try again"]),
        (errors.NotFoundError("unknown model 'x'"), ["does not host", "unknown model 'x'"]),
        (
            errors.InvalidArgumentError("bad regex", field="custom_regex"),
            ["bad regex", "Fix the custom regex"],
        ),
        (errors.InvalidArgumentError("no template", field="use_chat_template"), ["Chat template"]),
        (errors.InternalError("boom"), ["failed: boom", "keeps working"]),
    ],
)
def test_errors_in_plain_words(error: errors.SeqsalError, fragments: list[str]) -> None:
    text = clients.describe_error(error, "saliency", "h:1")
    for fragment in fragments:
        assert fragment in text, text


def test_target_of_each_kind() -> None:
    side = SideState(prompt="Hi", chat_template=True)
    spec = target_spec(side, GEN)
    assert (spec.prompt, spec.model, spec.target_token_ids, spec.foil) == (GEN.prompt, "tiny", (7, 8), None)
    ref = target_spec(SideState(prompt="Hi", target_kind="reference", reference=" Yo"), GEN)
    assert ref.target_text == " Yo" and ref.prompt == GEN.prompt and not ref.target_token_ids
    foil = target_spec(SideState(prompt="Hi", target_kind="foil", foil=" Bye"), GEN)
    assert foil.target_token_ids == (7, 8) and foil.foil == " Bye"
    foil_ref = target_spec(SideState(prompt="Hi", target_kind="foil", reference=" Yo", foil=" Bye"), GEN)
    assert foil_ref.target_text == " Yo" and foil_ref.foil == " Bye"
    # Without a response, a reference is explained against the raw prompt (no chat template).
    offline = target_spec(SideState(prompt="Hi", target_kind="reference", reference=" Yo"), None)
    assert offline.prompt == "Hi" and offline.model == ""


@pytest.mark.parametrize(
    ("side", "generation", "fragment"),
    [
        (SideState(prompt="Hi"), None, "No response yet"),
        (
            SideState(prompt="Hi", chat_template=True, target_kind="reference", reference="x"),
            None,
            "chat template",
        ),
        (SideState(prompt="Hi", target_kind="reference"), GEN, "Type a reference target"),
        (SideState(prompt="Hi", target_kind="foil"), GEN, "Type a foil"),
        (SideState(prompt="Hi", candidate=1), GEN, "response is empty"),
    ],
)
def test_target_problems_in_plain_words(
    side: SideState, generation: Generation | None, fragment: str
) -> None:
    with pytest.raises(TargetProblem, match=fragment):
        target_spec(side, generation)


def test_requests() -> None:
    side = SideState(method="GRAD_DOT_INPUT", granularity="CUSTOM_REGEX", regex="x")
    spec = target_spec(SideState(prompt="Hi", target_kind="foil", foil=" Bye"), GEN)
    request = targets.saliency_request(spec, side, granularity="CUSTOM_REGEX", target_mask=[False, True])
    assert list(request.problem.methods) == [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT]  # one backward
    assert (
        request.problem.custom_regex == "x"
        and request.problem.foil == " Bye"
        and list(request.target_mask) == [False, True]
    )
    tokens = targets.saliency_request(spec, side, granularity="TOKENS")
    assert tokens.problem.custom_regex == "" and tokens.problem.granularity == common_pb2.TOKENS
    all_segments = targets.all_segments_request(tokens)
    assert all_segments.problem.foil == " Bye" and list(all_segments.problem.target_token_ids) == [7, 8]
    # the prompt as the model saw it, by its ids from Generate (never tokenised again)
    assert list(all_segments.problem.prompt_token_ids) == [1, 2] and all_segments.problem.prompt == ""
    assert targets.request_key(tokens) != targets.request_key(request)
    assert targets.request_key(tokens) != targets.request_key(all_segments)
    ig = targets.saliency_request(spec, SideState(method="INTEGRATED_GRADIENTS"), granularity="WORDS")
    assert list(ig.problem.methods) == [common_pb2.INTEGRATED_GRADIENTS]


def test_method_index_and_response_cache() -> None:
    response = saliency_pb2.SaliencyResponse(
        scores=[saliency_pb2.MethodScores(method=common_pb2.GRAD_L2), saliency_pb2.MethodScores(method=2)]
    )
    assert targets.method_index(response, "GRAD_DOT_INPUT") == 1
    assert targets.method_index(response, "INTEGRATED_GRADIENTS") == 0
    cache = targets.ResponseCache(max_entries=2)
    for key in "abc":
        cache.put(key, response)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is response


def test_generate_refuses_an_empty_prompt() -> None:
    with pytest.raises(TargetProblem, match="prompt is empty"):
        generation.generate(clients.Endpoints("h:1", "h:2"), SideState(prompt="  "))


def test_prefetch_against_a_dead_server_reports_in_plain_words() -> None:
    prefetcher = prefetch.Prefetcher()
    request = saliency_pb2.SaliencyAllSegmentsRequest(prompt="x", target="y", granularity=common_pb2.WORDS)
    key = prefetcher.start("s:main", clients.Endpoints("127.0.0.1:9", "127.0.0.1:9"), request)
    progress = prefetcher.wait(key, 30)
    assert progress is not None and progress.finished and "not reachable" in (progress.error or "")
    assert prefetcher.progress("unknown") is None


def test_prefetch_owners_and_sweep() -> None:
    prefetcher = prefetch.Prefetcher()
    dead = clients.Endpoints("127.0.0.1:9", "127.0.0.1:9")
    request = saliency_pb2.SaliencyAllSegmentsRequest(prompt="x", target="y", granularity=common_pb2.WORDS)
    key = prefetcher.start("s1:main", dead, request)
    assert prefetcher.start("s1:main", dead, request) == key  # idempotent while it runs
    prefetcher.wait(key, 30)
    assert prefetcher.start("s1:main", dead, request) == key  # a job that failed is started again
    prefetcher.wait(key, 30)
    assert prefetcher.sweep(lambda owner: not owner.startswith("s1:")) == ["s1:main"]
    assert prefetcher.response(key, 0) is None  # the dead server returned nothing


def test_prefetch_requests_are_background_and_keep_what_the_stream_returns() -> None:
    spec = TargetSpec(prompt="p", model="m", target_text="t")
    whole = targets.saliency_request(spec, SideState(), granularity="WORDS")
    assert whole.priority == saliency_pb2.PRIORITY_UNSPECIFIED  # a click: interactive
    background = targets.all_segments_request(whole)
    assert background.priority == saliency_pb2.PRIORITY_BACKGROUND
    assert background.tokens_once  # tokens and segments once; the prefetcher restores the rest
    prefetcher = prefetch.Prefetcher(max_responses=2)
    for index in range(3):
        message = saliency_pb2.SaliencyAllSegmentsResponse(
            segment_index=index, saliency=saliency_pb2.SaliencyResponse(target_mask=[index == 0])
        )
        prefetcher._keep("k", message)
    assert prefetcher.response("k", 0) is None  # the oldest went first
    kept = prefetcher.response("k", 2)
    assert kept is not None and list(kept.target_mask) == [False]
