from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_UNSPECIFIED: _ClassVar[Part]
    PROMPT: _ClassVar[Part]
    TARGET: _ClassVar[Part]
    FOIL: _ClassVar[Part]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    GRAD_L2: _ClassVar[Method]
    GRAD_DOT_INPUT: _ClassVar[Method]
    INTEGRATED_GRADIENTS: _ClassVar[Method]
    OCCLUSION: _ClassVar[Method]
    LIME: _ClassVar[Method]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    TOKENS: _ClassVar[Granularity]
    WORDS: _ClassVar[Granularity]
    SENTENCES: _ClassVar[Granularity]
    LINES: _ClassVar[Granularity]
    PARAGRAPHS: _ClassVar[Granularity]
    CUSTOM_REGEX: _ClassVar[Granularity]
PART_UNSPECIFIED: Part
PROMPT: Part
TARGET: Part
FOIL: Part
METHOD_UNSPECIFIED: Method
GRAD_L2: Method
GRAD_DOT_INPUT: Method
INTEGRATED_GRADIENTS: Method
OCCLUSION: Method
LIME: Method
GRANULARITY_UNSPECIFIED: Granularity
TOKENS: Granularity
WORDS: Granularity
SENTENCES: Granularity
LINES: Granularity
PARAGRAPHS: Granularity
CUSTOM_REGEX: Granularity

class Token(_message.Message):
    __slots__ = ("id", "text", "start", "end", "special", "part")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    start: int
    end: int
    special: bool
    part: Part
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., special: _Optional[bool] = ..., part: _Optional[_Union[Part, str]] = ...) -> None: ...

class CharSpan(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("part", "token_start", "token_end", "char_start", "char_end", "text", "scores")
    PART_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    part: Part
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, part: _Optional[_Union[Part, str]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., text: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "revision", "architecture", "max_tokens", "dtype", "device", "is_default")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    revision: str
    architecture: str
    max_tokens: int
    dtype: str
    device: str
    is_default: bool
    def __init__(self, id: _Optional[str] = ..., revision: _Optional[str] = ..., architecture: _Optional[str] = ..., max_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text", "as_target")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AS_TARGET_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    as_target: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., as_target: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens", "model")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    model: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...
