"""Hostile-input fuzzing of the gRPC services: strategies, the call checker and the tally.

Used by ``tests/test_fuzz_saliency.py`` and ``tests/test_fuzz_inference.py``. Every call goes
over a real channel (synchronous stubs, from a worker thread, while the in-process server runs
on the test's event loop) with a deadline, and must be answered with one of
:data:`ALLOWED`; an error must name, in its ``google.rpc.BadRequest`` detail, a field of the
request, and say that field's name in its message. A :class:`~health_probe.HealthProbe`
checks the server's health throughout.

Examples per test: ``SEQSAL_FUZZ_EXAMPLES`` (a longer run, random and new every time, e.g.
``SEQSAL_FUZZ_EXAMPLES=2000``); unset, each test runs its bounded, derandomized CI default.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message as pb_message
from health_probe import HealthProbe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqsal.client import channel_options, error_from_rpc
from seqsal.v1 import common_pb2

#: What a hostile request may get back; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED...) is a bug.
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
    }
)
#: Deadline of every fuzzed call: generous (a busy 2-core machine); a hang shows as DEADLINE_EXCEEDED.
CALL_DEADLINE_S = 60.0
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

_EXAMPLES = int(os.environ.get("SEQSAL_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings: ``ci_examples`` derandomized, or ``SEQSAL_FUZZ_EXAMPLES`` random ones."""
    return settings(
        max_examples=_EXAMPLES or ci_examples,
        derandomize=not _EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- strategies ----------------------------------------------------------------------------------

#: Texts that have broken tokenizers, renderers or regex engines somewhere.
NASTY_TEXTS = [
    "",
    " ",
    "\x00",
    "\x00\x01\x02\x1b[31m\x7f",
    "\r\n\r\n\t\x0b\x0c",
    "\u202e\u200b\u200d\ufeff\u2028\u2029",
    "😀👩‍👩‍👧‍👦🏳️‍🌈",
    "é" + "\u0301" * 50,
    "<s></s><unk><|endoftext|><|im_start|><pad>",
    "\ufffd\uffff\U0010ffff",
    "▁▁▁ ▁",
    "a" * 900 + "b",
]


def big_texts(megabyte: bool = True) -> st.SearchStrategy[str]:
    """Enormous strings: far over any model's context, and (``megabyte``) a 1 MB one."""
    sizes = ["x" * 5_000, "word " * 40_000, "é😀\x00" * 50_000]
    return st.sampled_from(sizes + ["a" * 1_000_000] * megabyte)


def texts(max_size: int = 80, megabyte: bool = True) -> st.SearchStrategy[str]:
    """Arbitrary Unicode (control chars included; never surrogates, which proto3 cannot carry).

    ``megabyte=False`` for a field that is processed whatever its size (Tokenize's text: a 1 MB
    one is answered, with a million tokens, which costs tens of seconds on a busy 2-core machine).
    """
    controls = st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"])
    return st.one_of(
        st.text(max_size=max_size),
        st.text(alphabet=controls, max_size=20),
        st.sampled_from(NASTY_TEXTS),
        big_texts(megabyte),
    )


def int32s() -> st.SearchStrategy[int]:
    """Small numbers (mostly valid), negatives and the int32 extremes."""
    return st.one_of(st.integers(-3, 40), st.integers(*INT32), st.sampled_from([INT32[0], INT32[1], -1, 0]))


def token_ids() -> st.SearchStrategy[list[int]]:
    """Token id lists: valid ids of the tiny models (< 600), out of range, negative, long."""
    small = st.lists(st.one_of(st.integers(0, 600), int32s()), max_size=12)
    return st.one_of(small, st.just([5] * 3000), st.just([]))


#: Patterns that backtrack exponentially in Python's re (the issue's server freeze) and other traps.
CATASTROPHIC_REGEXES = [
    r"(a+)+$",
    r"(a|aa)+$",
    r"(a*)*b$",
    r"(.*a){20}",
    r"((a{1,10}){1,10}){1,10}$",
    r"(\w+\s?)+$",
    r"(a)\1",
    r"(?=a)",
    r"(?<!a)b",
    r"x*",
    r"",
    r"(",
    r"[",
    r"a{1000000}",
    "a" * 2000,
    r"(?m)^",
    r"\b",
    r"\pL+",
]


def regexes() -> st.SearchStrategy[str]:
    """Known catastrophic patterns, random metachar soups and arbitrary text."""
    soup = st.text(alphabet="a()[]{}*+?|^$\\.bdw,0123456789:=!<>P-", max_size=24)
    return st.one_of(st.sampled_from(CATASTROPHIC_REGEXES), soup, st.text(max_size=20))


def invalid_utf8() -> st.SearchStrategy[bytes]:
    """Byte strings that are not UTF-8 (a lone surrogate's encoding among them)."""
    return st.sampled_from(
        [b"\xff", b"\xc3", b"\xed\xa0\x80", b"abc\x80def", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]
    )


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One protobuf length-delimited field (wire type 2), as appended to a serialized message."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def with_overrides(
    message: type[pb_message.Message], base: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """``message(**base)`` with up to three of ``fields`` replaced by hostile values.

    Few at a time, so that most requests get past the first check and reach deeper code. A
    name starting with ``_`` draws a dict of fields that only make sense together.
    """

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True))
        values = dict(base)
        for name in names:
            value = draw(fields[name])
            values.update(value if name.startswith("_") else {name: value})
        return message(**values)

    return build()


# --- the checker ---------------------------------------------------------------------------------


class Tally:
    """Outcomes per RPC and status, shared by a module's tests; written out by :func:`report`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.samples: dict[tuple[str, str], str] = {}  # one message per (rpc, status), for the report
        self.health_answers = 0
        self.health_failures = 0

    def add(self, rpc: str, code: grpc.StatusCode, message: str = "") -> None:
        with self.lock:
            self.outcomes[(rpc, code.name)] += 1
            self.samples.setdefault((rpc, code.name), message[:200])

    def report(self, name: str) -> str:
        """A one-line summary; also written as JSON under ``$SEQSAL_FUZZ_REPORT_DIR`` when set."""
        total = sum(self.outcomes.values())
        by_rpc: dict[str, dict[str, int]] = {}
        for (rpc, code), count in sorted(self.outcomes.items()):
            by_rpc.setdefault(rpc, {})[code] = count
        directory = os.environ.get("SEQSAL_FUZZ_REPORT_DIR")
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            record = {
                "calls": total,
                "by_rpc": by_rpc,
                "health_answers": self.health_answers,
                "health_failures": self.health_failures,
                "sample_messages": {
                    f"{rpc} {code}": text for (rpc, code), text in sorted(self.samples.items())
                },
            }
            (Path(directory) / f"{name}.json").write_text(json.dumps(record, indent=2))
        return (
            f"[fuzz] {name}: {total} calls {by_rpc}; health probe {self.health_answers} answers, "
            f"{self.health_failures} failures"
        )


def _top_level(field: str) -> str:
    """``targets[2].token_ids`` -> ``targets``."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def check_error(rpc: str, request_class: type[pb_message.Message], exc: grpc.RpcError) -> str | None:
    """Check a failed call: allowed status, a field of the request named in the detail and the message."""
    code = exc.code()  # type: ignore[attr-defined]
    assert code in ALLOWED, f"{rpc} answered {code.name}: {exc.details()}"  # type: ignore[attr-defined]
    error = error_from_rpc(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.field:
        return None  # the server is busy: no field to blame
    assert error.field, f"{rpc} {code.name} names no field: {error.message!r}"
    fields = request_class.DESCRIPTOR.fields_by_name
    assert _top_level(error.field) in fields, f"{rpc}: {error.field!r} is not a field of the request"
    assert _top_level(error.field) in error.message, (
        f"{rpc}: message does not name {error.field!r}: {error.message!r}"
    )
    return error.field


def call(
    tally: Tally,
    rpc: str,
    request_class: type[pb_message.Message],
    invoke: Callable[[float], Any],
) -> tuple[Any, str | None]:
    """Run ``invoke(deadline)``; returns (the response or None, the field an error named)."""
    try:
        response = invoke(CALL_DEADLINE_S)
    except grpc.RpcError as exc:
        field = check_error(rpc, request_class, exc)
        tally.add(rpc, exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        return None, field
    tally.add(rpc, grpc.StatusCode.OK)
    return response, None


def open_channel(address: str) -> grpc.Channel:
    """A channel with the options seqsal's own clients use (64 MiB messages)."""
    return grpc.insecure_channel(address, options=channel_options())


async def fuzz_with_probe(address: str, tally: Tally, body: Callable[[grpc.Channel], None]) -> None:
    """Run ``body(channel)`` in a worker thread (the event loop keeps serving) beside a health probe."""

    def run() -> None:
        with open_channel(address) as channel:
            body(channel)

    async with HealthProbe(address) as probe:
        await asyncio.to_thread(run)
    tally.health_answers += probe.answers
    tally.health_failures += len(probe.failures)


# --- tests both services share -------------------------------------------------------------------

#: A raw request: (method name, request class, server-streaming?, bytes, the field the error must name).
RawRequest = tuple[str, type[pb_message.Message], bool, bytes, str]


def corrupted(name: str, base: pb_message.Message, streaming: bool, field: str, payload: bytes) -> RawRequest:
    """``base``'s bytes with string ``field`` appended again as ``payload`` (not UTF-8): the last one wins."""
    number = base.DESCRIPTOR.fields_by_name[field].number
    return name, type(base), streaming, base.SerializeToString() + length_delimited(number, payload), field


async def fuzz_raw(address: str, tally: Tally, service: str, raw: st.SearchStrategy[RawRequest]) -> None:
    """Each raw request is INVALID_ARGUMENT naming exactly the corrupted field."""

    def body(channel: grpc.Channel) -> None:
        @fuzz_settings(20)
        @given(request=raw)
        def fuzz(request: RawRequest) -> None:
            name, message_class, streaming, data, field = request
            kind = channel.unary_stream if streaming else channel.unary_unary
            rpc = kind(f"/{service}/{name}", request_serializer=None, response_deserializer=None)

            def invoke(deadline: float) -> Any:
                answer = rpc(data, timeout=deadline)
                return list(answer) if streaming else answer

            response, named = call(tally, name, message_class, invoke)
            assert response is None and named == field, (name, field, named)

        fuzz()

    await fuzz_with_probe(address, tally, body)


async def fuzz_rpc(
    address: str,
    tally: Tally,
    stub_class: type[Any],
    rpc: str,
    requests: st.SearchStrategy[Any],
    check: Callable[[Any, Any], None],
    examples: int,
    *,
    stream: bool = False,
) -> None:
    """Fuzz one RPC: every answer is allowed, an OK one passes ``check(request, response)``.

    After each example ListModels must still list the same models. A streaming RPC's
    response is the list of its messages.
    """

    def body(channel: grpc.Channel) -> None:
        stub = stub_class(channel)
        method = getattr(stub, rpc)
        listed = stub.ListModels(common_pb2.ListModelsRequest(), timeout=CALL_DEADLINE_S)
        models = {m.id for m in listed.models}

        @fuzz_settings(examples)
        @given(request=requests)
        def fuzz(request: Any) -> None:
            def invoke(deadline: float) -> Any:
                answer = method(request, timeout=deadline)
                return list(answer) if stream else answer

            response, _ = call(tally, rpc, type(request), invoke)
            if response is not None:
                check(request, response)
            still, _ = call(
                tally,
                "ListModels",
                common_pb2.ListModelsRequest,
                lambda t: stub.ListModels(common_pb2.ListModelsRequest(), timeout=t),
            )
            assert {m.id for m in still.models} == models

        fuzz()

    await fuzz_with_probe(address, tally, body)


def tokenize_requests(models: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """TokenizeRequests (the message both services share) with hostile model, text and part."""
    fields = {"model": models, "text": texts(megabyte=False), "as_target": st.booleans()}
    return with_overrides(common_pb2.TokenizeRequest, {"text": "Hi there"}, fields)


def check_tokens(request: common_pb2.TokenizeRequest, response: common_pb2.TokenizeResponse) -> None:
    """Tokens tile the text exactly."""
    regular = [t for t in response.tokens if not t.special]
    assert "".join(t.text for t in regular) == request.text
    assert all(a.end == b.start for a, b in itertools.pairwise(regular))
