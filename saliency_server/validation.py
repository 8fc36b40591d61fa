"""Turn a wire request into a validated computation, or a clear error naming the field.

Everything a client can get wrong is checked here, before any model work:
empty texts, both or neither prompt and target forms, token ids outside the
vocabulary, masks and spans that do not fit the target, unknown methods and
granularities, invalid regexes, too many tokens.

A request carries its problem in ``problem`` (a ``TeacherForcedProblem``) or, as clients
written before it did, in the same fields at the top level; :func:`problem_message` turns
either form into the one message :func:`build_problem` validates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from saliency_server.engine import SaliencyInputs
from saliency_server.model_host import HostedModel
from saliency_server.perturbation import (
    PERTURBATION_METHODS,
    Feature,
    PerturbationSpec,
    Scorer,
    check_count,
    perturbation_segments,
    prompt_features,
    validate_options,
)
from seqsal import segmentation
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.tokenization import ContextLimit, part_text, prompt_tokens_from_ids, tokenize, tokens_from_ids

DEFAULT_METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)
MAX_IG_STEPS = 1024
METHOD_NAMES = ", ".join(n for n in common_pb2.Method.keys() if n != "METHOD_UNSPECIFIED")
GRANULARITY_NAMES = ", ".join(n for n in common_pb2.Granularity.keys() if n != "GRANULARITY_UNSPECIFIED")


@dataclass
class Problem:
    """A validated teacher-forced problem: tokens, ids and what to compute."""

    hosted: HostedModel
    prompt_tokens: list[common_pb2.Token]
    target_tokens: list[common_pb2.Token]
    foil_tokens: list[common_pb2.Token] | None
    methods: list[int]
    granularity: int
    custom_regex: str
    ig_steps: int
    perturbation: PerturbationSpec = field(default_factory=PerturbationSpec)
    #: where the perturbation methods' variants are scored (set by the serving layer before it
    #: looks up the cache; part of their cache keys); None for a problem without them
    scorer: Scorer | None = None

    @cached_property
    def features(self) -> list[Feature]:
        """The prompt segments the perturbation methods remove (see :mod:`saliency_server.perturbation`)."""
        return prompt_features(
            self.tokens, perturbation_segments(self.tokens, self.segments, self.granularity)
        )

    @cached_property
    def segments(self) -> list[common_pb2.Segment]:
        """Segments of every part at the requested granularity, without scores (empty if none)."""
        return segmentation.segment_tokens(self.tokens, self.granularity, self.custom_regex)

    @cached_property
    def tokens(self) -> list[common_pb2.Token]:
        return self.prompt_tokens + self.target_tokens + (self.foil_tokens or [])

    @cached_property
    def inputs(self) -> SaliencyInputs:
        return SaliencyInputs(
            prompt_ids=[t.id for t in self.prompt_tokens],
            target_ids=[t.id for t in self.target_tokens],
            foil_ids=None if self.foil_tokens is None else [t.id for t in self.foil_tokens],
        )

    @cached_property
    def target_text(self) -> str:
        return part_text(self.target_tokens)


def validate_methods(methods: Sequence[int]) -> list[int]:
    """Requested methods without repeats, in order; empty = GRAD_L2 and GRAD_DOT_INPUT."""
    if not methods:
        return list(DEFAULT_METHODS)
    known = set(common_pb2.Method.values()) - {common_pb2.METHOD_UNSPECIFIED}
    out: list[int] = []
    for i, method in enumerate(methods):
        if method not in known:
            raise InvalidArgumentError(
                f"methods[{i}] = {method} is not a saliency method; use one of {METHOD_NAMES}",
                field="methods",
            )
        if method not in out:
            out.append(method)
    return out


def validate_granularity(granularity: int, custom_regex: str, *, required: bool) -> str:
    """Check the granularity (and its regex); returns the regex to use ('' unless CUSTOM_REGEX)."""
    if granularity not in common_pb2.Granularity.values():
        raise InvalidArgumentError(
            f"granularity = {granularity} is unknown; use one of {GRANULARITY_NAMES}", field="granularity"
        )
    if required and granularity == common_pb2.GRANULARITY_UNSPECIFIED:
        raise InvalidArgumentError(
            f"granularity is required here; use one of {GRANULARITY_NAMES}", field="granularity"
        )
    if granularity == common_pb2.CUSTOM_REGEX:
        segmentation.validate_regex(custom_regex)
        return custom_regex
    if custom_regex:
        raise InvalidArgumentError(
            "custom_regex is only used with granularity CUSTOM_REGEX; set that granularity or drop the regex",
            field="custom_regex",
        )
    return ""


#: The fields of a TeacherForcedProblem that requests also have at the top level (deprecated).
FLAT_FIELDS = (
    "model",
    "prompt",
    "target",
    "target_token_ids",
    "methods",
    "foil",
    "granularity",
    "custom_regex",
    "ig_steps",
    "perturbation",
)

ProblemRequest = saliency_pb2.SaliencyRequest | saliency_pb2.SaliencyAllSegmentsRequest


def problem_message(request: ProblemRequest, *, prefix: str = "") -> saliency_pb2.TeacherForcedProblem:
    """The request's problem: its ``problem``, or the deprecated top-level fields copied into one.

    Setting both is INVALID_ARGUMENT naming the top-level fields set (``prefix``: where the request
    sits in its caller's message, e.g. ``"problem."`` for Verify's).
    """
    flat = [(f, value) for f, value in request.ListFields() if f.name in FLAT_FIELDS]
    if request.HasField("problem"):
        if flat:
            names = ", ".join(prefix + f.name for f, _ in flat)
            raise InvalidArgumentError(
                f"both {prefix}problem and the deprecated top-level fields {names} are set; send the "
                f"problem in {prefix}problem only",
                field=prefix + flat[0][0].name,
            )
        return request.problem
    problem = saliency_pb2.TeacherForcedProblem()
    for descriptor, value in flat:
        if descriptor.is_repeated:
            getattr(problem, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(problem, descriptor.name).CopyFrom(value)
        else:
            setattr(problem, descriptor.name, value)
    return problem


def _prompt_tokens(hosted: HostedModel, prompt: str, prompt_ids: Sequence[int]) -> list[common_pb2.Token]:
    if prompt and prompt_ids:
        raise InvalidArgumentError(
            "both prompt and prompt_token_ids are set; send exactly one of them", field="prompt"
        )
    if prompt_ids:
        tokens = prompt_tokens_from_ids(hosted.tokenizer, prompt_ids, field="prompt_token_ids")
        if all(t.special for t in tokens):
            raise InvalidArgumentError(
                f"prompt_token_ids has only special tokens ({len(tokens)}); send the whole prompt's ids, "
                "e.g. the prompt_token_ids Generate returned",
                field="prompt_token_ids",
            )
        return tokens
    if not prompt:
        raise InvalidArgumentError(
            "prompt is empty; send the text the model was given in `prompt`, or its ids in "
            "`prompt_token_ids`",
            field="prompt",
        )
    return tokenize(hosted.tokenizer, prompt, part=common_pb2.PROMPT, add_special_tokens=True)


def _target_tokens(
    hosted: HostedModel, target: str, target_ids: Sequence[int], prompt_tokens: Sequence[common_pb2.Token]
) -> list[common_pb2.Token]:
    if target and target_ids:
        raise InvalidArgumentError(
            "both target and target_token_ids are set; send exactly one of them", field="target"
        )
    if target_ids:
        context = [t.id for t in prompt_tokens if not t.special][-1:]
        return tokens_from_ids(
            hosted.tokenizer,
            target_ids,
            part=common_pb2.TARGET,
            field="target_token_ids",
            context_ids=context,
        )
    if not target:
        raise InvalidArgumentError(
            "target is empty; send the text to explain in `target` or its ids in `target_token_ids`",
            field="target",
        )
    tokens = tokenize(hosted.tokenizer, target, part=common_pb2.TARGET, add_special_tokens=False)
    if not tokens:
        raise InvalidArgumentError("target has no tokens for this model's tokenizer", field="target")
    return tokens


def build_problem(
    hosted: HostedModel,
    message: saliency_pb2.TeacherForcedProblem,
    *,
    default_ig_steps: int,
    require_granularity: bool = False,
    max_perturbations: int = 512,
) -> Problem:
    """Validate and tokenise; raises InvalidArgumentError naming the field at the first problem."""
    prompt, prompt_ids = message.prompt, list(message.prompt_token_ids)
    target, foil = message.target, message.foil if message.HasField("foil") else None
    if not prompt and not prompt_ids:
        _prompt_tokens(hosted, prompt, prompt_ids)  # names the field before anything else
    resolved_methods = validate_methods(message.methods)
    regex = validate_granularity(message.granularity, message.custom_regex, required=require_granularity)
    ig_steps = message.ig_steps
    if not 0 <= ig_steps <= MAX_IG_STEPS:
        raise InvalidArgumentError(
            f"ig_steps = {ig_steps} is out of range; use 1..{MAX_IG_STEPS}, or 0 for the default",
            field="ig_steps",
        )
    # SEQSAL_MAX_TOKENS, capped by the model's context (saliency_server/model_host.py)
    limit = ContextLimit(hosted.id, hosted.info.max_tokens, "SEQSAL_MAX_TOKENS", hosted.tokenizer)
    limit.check(
        f"prompt + target{' + foil' if foil else ''}",
        "prompt",
        tokens=len(prompt_ids),
        chars=len(prompt) + len(target) + len(foil or ""),
    )
    prompt_tokens = _prompt_tokens(hosted, prompt, prompt_ids)
    target_tokens = _target_tokens(hosted, target, message.target_token_ids, prompt_tokens)
    foil_tokens = None
    if foil is not None:
        if not foil:
            raise InvalidArgumentError(
                "foil is set but empty; send the alternative text, or leave foil unset", field="foil"
            )
        foil_tokens = tokenize(hosted.tokenizer, foil, part=common_pb2.FOIL, add_special_tokens=False)
    limit.check(
        f"prompt + target{' + foil' if foil_tokens else ''}",
        "prompt",
        tokens=len(prompt_tokens) + len(target_tokens) + len(foil_tokens or []),
    )
    problem = Problem(
        hosted=hosted,
        prompt_tokens=prompt_tokens,
        target_tokens=target_tokens,
        foil_tokens=foil_tokens,
        methods=resolved_methods,
        granularity=message.granularity,
        custom_regex=regex,
        ig_steps=ig_steps or default_ig_steps,
    )
    _ = problem.segments  # segment here, in the caller's worker thread, never on the event loop
    if any(m in PERTURBATION_METHODS for m in resolved_methods):
        options = message.perturbation if message.HasField("perturbation") else None
        problem.perturbation = _perturbation(hosted, options, max_perturbations)
        count = len(problem.features)
        if count == 0:
            raise InvalidArgumentError(
                "the prompt has no segment to perturb (only special tokens); OCCLUSION and LIME remove "
                "prompt segments",
                field="prompt",
            )
        if common_pb2.OCCLUSION in resolved_methods:
            check_count(
                count + 1, max_perturbations, what=f"OCCLUSION of {count} segments", field="granularity"
            )
    return problem


def _perturbation(
    hosted: HostedModel, options: saliency_pb2.PerturbationOptions | None, max_perturbations: int
) -> PerturbationSpec:
    options = options or saliency_pb2.PerturbationOptions()
    filler: list[int] = []
    if options.filler:
        filler = [
            t.id
            for t in tokenize(
                hosted.tokenizer, options.filler, part=common_pb2.TARGET, add_special_tokens=False
            )
        ]
        if not filler:
            raise InvalidArgumentError(
                "perturbation.filler has no tokens for this model's tokenizer", field="perturbation.filler"
            )
    return validate_options(options, filler, max_perturbations)


def resolve_selection(problem: Problem, request: saliency_pb2.SaliencyRequest) -> np.ndarray:
    """The target tokens to explain, as one bool per target token."""
    n_target = len(problem.target_tokens)
    mask = list(request.target_mask)
    spans = list(request.target_spans)
    if mask and spans:
        raise InvalidArgumentError(
            "both target_mask and target_spans are set; send one of them", field="target_spans"
        )
    if mask:
        if len(mask) != n_target:
            raise InvalidArgumentError(
                f"target_mask has {len(mask)} entries but the target has {n_target} tokens; send one bool "
                "per target token (Tokenize with as_target shows them) or leave it empty for all",
                field="target_mask",
            )
        selection = np.asarray(mask, dtype=bool)
    elif spans:
        text_length = len(problem.target_text)
        selection = np.zeros(n_target, dtype=bool)
        for i, span in enumerate(spans):
            if not 0 <= span.start < span.end <= text_length:
                raise InvalidArgumentError(
                    f"target_spans[{i}] = [{span.start}, {span.end}) is not a non-empty range inside the "
                    f"target text (0..{text_length} chars)",
                    field="target_spans",
                )
            for j, token in enumerate(problem.target_tokens):
                if not token.special and token.start < span.end and token.end > span.start:
                    selection[j] = True
    else:
        selection = np.ones(n_target, dtype=bool)
    if not selection.any():
        field = "target_spans" if spans else "target_mask"
        raise InvalidArgumentError(
            f"{field} selects no target token; select at least one, or leave it empty to explain all",
            field=field,
        )
    return selection
