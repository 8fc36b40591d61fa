from seqsal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BACKGROUND: _ClassVar[Priority]

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_PREPARING: _ClassVar[RequestState]
    REQUEST_STATE_QUEUED: _ClassVar[RequestState]
    REQUEST_STATE_RUNNING: _ClassVar[RequestState]
    REQUEST_STATE_PAUSED: _ClassVar[RequestState]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BACKGROUND: Priority
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_PREPARING: RequestState
REQUEST_STATE_QUEUED: RequestState
REQUEST_STATE_RUNNING: RequestState
REQUEST_STATE_PAUSED: RequestState

class TeacherForcedProblem(_message.Message):
    __slots__ = ("model", "prompt", "prompt_token_ids", "target", "target_token_ids", "foil", "methods", "granularity", "custom_regex", "ig_steps", "perturbation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FOIL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_REGEX_FIELD_NUMBER: _ClassVar[int]
    IG_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    target: str
    target_token_ids: _containers.RepeatedScalarFieldContainer[int]
    foil: str
    methods: _containers.RepeatedScalarFieldContainer[_common_pb2.Method]
    granularity: _common_pb2.Granularity
    custom_regex: str
    ig_steps: int
    perturbation: PerturbationOptions
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., target: _Optional[str] = ..., target_token_ids: _Optional[_Iterable[int]] = ..., foil: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[_common_pb2.Method, str]]] = ..., granularity: _Optional[_Union[_common_pb2.Granularity, str]] = ..., custom_regex: _Optional[str] = ..., ig_steps: _Optional[int] = ..., perturbation: _Optional[_Union[PerturbationOptions, _Mapping]] = ...) -> None: ...

class SaliencyRequest(_message.Message):
    __slots__ = ("model", "prompt", "target", "target_token_ids", "target_mask", "target_spans", "methods", "foil", "granularity", "custom_regex", "ig_steps", "priority", "perturbation", "problem")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MASK_FIELD_NUMBER: _ClassVar[int]
    TARGET_SPANS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    FOIL_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_REGEX_FIELD_NUMBER: _ClassVar[int]
    IG_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    target: str
    target_token_ids: _containers.RepeatedScalarFieldContainer[int]
    target_mask: _containers.RepeatedScalarFieldContainer[bool]
    target_spans: _containers.RepeatedCompositeFieldContainer[_common_pb2.CharSpan]
    methods: _containers.RepeatedScalarFieldContainer[_common_pb2.Method]
    foil: str
    granularity: _common_pb2.Granularity
    custom_regex: str
    ig_steps: int
    priority: Priority
    perturbation: PerturbationOptions
    problem: TeacherForcedProblem
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., target: _Optional[str] = ..., target_token_ids: _Optional[_Iterable[int]] = ..., target_mask: _Optional[_Iterable[bool]] = ..., target_spans: _Optional[_Iterable[_Union[_common_pb2.CharSpan, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[_common_pb2.Method, str]]] = ..., foil: _Optional[str] = ..., granularity: _Optional[_Union[_common_pb2.Granularity, str]] = ..., custom_regex: _Optional[str] = ..., ig_steps: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., perturbation: _Optional[_Union[PerturbationOptions, _Mapping]] = ..., problem: _Optional[_Union[TeacherForcedProblem, _Mapping]] = ...) -> None: ...

class PerturbationOptions(_message.Message):
    __slots__ = ("filler", "samples", "seed", "ridge_alpha")
    FILLER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RIDGE_ALPHA_FIELD_NUMBER: _ClassVar[int]
    filler: str
    samples: int
    seed: int
    ridge_alpha: float
    def __init__(self, filler: _Optional[str] = ..., samples: _Optional[int] = ..., seed: _Optional[int] = ..., ridge_alpha: _Optional[float] = ...) -> None: ...

class MethodScores(_message.Message):
    __slots__ = ("method", "scores", "completeness_residual", "ig_steps", "r2", "perturbations", "scored_by")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    IG_STEPS_FIELD_NUMBER: _ClassVar[int]
    R2_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    SCORED_BY_FIELD_NUMBER: _ClassVar[int]
    method: _common_pb2.Method
    scores: _containers.RepeatedScalarFieldContainer[float]
    completeness_residual: float
    ig_steps: int
    r2: float
    perturbations: int
    scored_by: str
    def __init__(self, method: _Optional[_Union[_common_pb2.Method, str]] = ..., scores: _Optional[_Iterable[float]] = ..., completeness_residual: _Optional[float] = ..., ig_steps: _Optional[int] = ..., r2: _Optional[float] = ..., perturbations: _Optional[int] = ..., scored_by: _Optional[str] = ...) -> None: ...

class SaliencyResponse(_message.Message):
    __slots__ = ("tokens", "scores", "segments", "granularity", "target_mask", "target_logprob", "target_token_logprobs", "foil_logprob", "model", "revision", "dtype", "device", "cache_hit", "server_time_ms")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_MASK_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FOIL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.Token]
    scores: _containers.RepeatedCompositeFieldContainer[MethodScores]
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Segment]
    granularity: _common_pb2.Granularity
    target_mask: _containers.RepeatedScalarFieldContainer[bool]
    target_logprob: float
    target_token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    foil_logprob: float
    model: str
    revision: str
    dtype: str
    device: str
    cache_hit: bool
    server_time_ms: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[_common_pb2.Token, _Mapping]]] = ..., scores: _Optional[_Iterable[_Union[MethodScores, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.Segment, _Mapping]]] = ..., granularity: _Optional[_Union[_common_pb2.Granularity, str]] = ..., target_mask: _Optional[_Iterable[bool]] = ..., target_logprob: _Optional[float] = ..., target_token_logprobs: _Optional[_Iterable[float]] = ..., foil_logprob: _Optional[float] = ..., model: _Optional[str] = ..., revision: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., server_time_ms: _Optional[float] = ...) -> None: ...

class SaliencyAllSegmentsRequest(_message.Message):
    __slots__ = ("model", "prompt", "target", "target_token_ids", "methods", "foil", "granularity", "custom_regex", "ig_steps", "priority", "perturbation", "problem", "tokens_once")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    FOIL_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_REGEX_FIELD_NUMBER: _ClassVar[int]
    IG_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_ONCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    target: str
    target_token_ids: _containers.RepeatedScalarFieldContainer[int]
    methods: _containers.RepeatedScalarFieldContainer[_common_pb2.Method]
    foil: str
    granularity: _common_pb2.Granularity
    custom_regex: str
    ig_steps: int
    priority: Priority
    perturbation: PerturbationOptions
    problem: TeacherForcedProblem
    tokens_once: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., target: _Optional[str] = ..., target_token_ids: _Optional[_Iterable[int]] = ..., methods: _Optional[_Iterable[_Union[_common_pb2.Method, str]]] = ..., foil: _Optional[str] = ..., granularity: _Optional[_Union[_common_pb2.Granularity, str]] = ..., custom_regex: _Optional[str] = ..., ig_steps: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., perturbation: _Optional[_Union[PerturbationOptions, _Mapping]] = ..., problem: _Optional[_Union[TeacherForcedProblem, _Mapping]] = ..., tokens_once: _Optional[bool] = ...) -> None: ...

class SaliencyAllSegmentsResponse(_message.Message):
    __slots__ = ("segment_index", "segment_count", "target_segment", "saliency")
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TARGET_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    segment_index: int
    segment_count: int
    target_segment: _common_pb2.Segment
    saliency: SaliencyResponse
    def __init__(self, segment_index: _Optional[int] = ..., segment_count: _Optional[int] = ..., target_segment: _Optional[_Union[_common_pb2.Segment, _Mapping]] = ..., saliency: _Optional[_Union[SaliencyResponse, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("problem", "k", "random_draws", "seed")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RANDOM_DRAWS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    problem: SaliencyRequest
    k: _containers.RepeatedScalarFieldContainer[int]
    random_draws: int
    seed: int
    def __init__(self, problem: _Optional[_Union[SaliencyRequest, _Mapping]] = ..., k: _Optional[_Iterable[int]] = ..., random_draws: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class VerifyStep(_message.Message):
    __slots__ = ("k", "segment_indices", "topk_removed_logprob", "topk_drop", "random_drops", "random_drop_mean", "random_drop_std", "topk_only_logprob", "ablated_prompt", "ablated_prompt_token_ids")
    K_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOPK_REMOVED_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOPK_DROP_FIELD_NUMBER: _ClassVar[int]
    RANDOM_DROPS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_DROP_MEAN_FIELD_NUMBER: _ClassVar[int]
    RANDOM_DROP_STD_FIELD_NUMBER: _ClassVar[int]
    TOPK_ONLY_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ABLATED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ABLATED_PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    k: int
    segment_indices: _containers.RepeatedScalarFieldContainer[int]
    topk_removed_logprob: float
    topk_drop: float
    random_drops: _containers.RepeatedScalarFieldContainer[float]
    random_drop_mean: float
    random_drop_std: float
    topk_only_logprob: float
    ablated_prompt: str
    ablated_prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, k: _Optional[int] = ..., segment_indices: _Optional[_Iterable[int]] = ..., topk_removed_logprob: _Optional[float] = ..., topk_drop: _Optional[float] = ..., random_drops: _Optional[_Iterable[float]] = ..., random_drop_mean: _Optional[float] = ..., random_drop_std: _Optional[float] = ..., topk_only_logprob: _Optional[float] = ..., ablated_prompt: _Optional[str] = ..., ablated_prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("saliency", "method", "full_logprob", "steps", "removable_segments", "scored_by", "perturbations", "server_time_ms")
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REMOVABLE_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SCORED_BY_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    saliency: SaliencyResponse
    method: _common_pb2.Method
    full_logprob: float
    steps: _containers.RepeatedCompositeFieldContainer[VerifyStep]
    removable_segments: int
    scored_by: str
    perturbations: int
    server_time_ms: float
    def __init__(self, saliency: _Optional[_Union[SaliencyResponse, _Mapping]] = ..., method: _Optional[_Union[_common_pb2.Method, str]] = ..., full_logprob: _Optional[float] = ..., steps: _Optional[_Iterable[_Union[VerifyStep, _Mapping]]] = ..., removable_segments: _Optional[int] = ..., scored_by: _Optional[str] = ..., perturbations: _Optional[int] = ..., server_time_ms: _Optional[float] = ...) -> None: ...

class GetRequestStatusRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("rpc", "model", "state", "priority", "ahead", "interactive_ahead", "joined", "segments_total", "segments_done", "preemptions", "elapsed_ms")
    RPC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_AHEAD_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_DONE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    rpc: str
    model: str
    state: RequestState
    priority: Priority
    ahead: int
    interactive_ahead: int
    joined: bool
    segments_total: int
    segments_done: int
    preemptions: int
    elapsed_ms: float
    def __init__(self, rpc: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[RequestState, str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., ahead: _Optional[int] = ..., interactive_ahead: _Optional[int] = ..., joined: _Optional[bool] = ..., segments_total: _Optional[int] = ..., segments_done: _Optional[int] = ..., preemptions: _Optional[int] = ..., elapsed_ms: _Optional[float] = ...) -> None: ...

class GetRequestStatusResponse(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[RequestStatus]
    def __init__(self, calls: _Optional[_Iterable[_Union[RequestStatus, _Mapping]]] = ...) -> None: ...
