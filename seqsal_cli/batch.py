"""``seqsal batch``: explanations for a whole JSONL set, through the two services.

Each input line is a JSON object with ``prompt`` and optionally ``id``,
``target`` (explained as is; without it the inference service generates one,
greedy) and ``foil``. Each output line has the row's ``id``, the prompt and
target actually explained, whether the target was generated, and the full
SaliencyResponse (proto JSON) - or an ``error`` with its code, field and
message. With ``--verify`` each line also has ``verify``: per method, the
ablation test of its explanation (``seqsal.verification.record``), which
``seqsal report`` compares. Rows are processed with bounded concurrency and
written as they finish; a rerun skips ids already in the output (a half-written last line
from an interrupted run is dropped first).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from seqsal import verification
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient, saliency_request, verify_request
from seqsal.errors import InvalidArgumentError, SeqsalError, UnavailableError
from seqsal.retry import RetryPolicy
from seqsal.v1 import common_pb2, saliency_pb2

#: Deadline of the check, before the first row, that the services are up.
PROBE_TIMEOUT_S = 10.0
#: Rows wait for a restarting server (within each call's deadline) rather than fail.
RIDE_OUT_RESTARTS = RetryPolicy(wait_for_ready=True)


@dataclass(frozen=True)
class BatchOptions:
    """What to compute for every row."""

    methods: Sequence[int] = ()
    granularity: int = common_pb2.SENTENCES
    custom_regex: str = ""
    max_new_tokens: int = 128
    use_chat_template: bool = False
    model: str = ""
    concurrency: int = 4
    #: add each method's ablation test (Verify) to every row
    verify: bool = False


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, row)`` for each non-empty input line; the id defaults to the line number (from 1)."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}:{number} is not JSON: {exc}", field="input") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise InvalidArgumentError(
                    f'{path}:{number} needs a JSON object with a "prompt" string', field="input"
                )
            yield str(row.get("id", number)), row


def done_ids(path: Path) -> set[str]:
    """Ids already written to ``path``; truncates a half-written last line left by an interrupted run."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    ids = set()
    for line in complete.decode("utf-8").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


async def explain_row(
    row_id: str,
    row: dict[str, Any],
    options: BatchOptions,
    saliency: AsyncSaliencyClient,
    inference: AsyncInferenceClient | None,
) -> dict[str, Any]:
    """One output record for one input row (errors become an ``error`` record)."""
    record: dict[str, Any] = {"id": row_id}
    try:
        prompt, target, target_ids = row["prompt"], row.get("target"), None
        generated = target is None
        if generated:
            if inference is None:
                raise InvalidArgumentError(
                    "this row has no target and no inference server was given", field="target"
                )
            response = await inference.generate(
                prompt=prompt,
                max_tokens=options.max_new_tokens,
                use_chat_template=options.use_chat_template,
                model=options.model,
            )
            prompt, target = response.prompt, response.candidates[0].text
            target_ids = list(response.candidates[0].token_ids)
        result = await saliency.saliency(
            prompt=prompt,
            target="" if target_ids else target,
            target_token_ids=target_ids or (),
            methods=options.methods,
            foil=row.get("foil"),
            granularity=options.granularity,
            custom_regex=options.custom_regex,
            model=options.model,
            priority=saliency_pb2.PRIORITY_BACKGROUND,  # an export: interactive users go first
        )
        record |= {
            "prompt": prompt,
            "target": target,
            "generated": generated,
            "saliency": json_format.MessageToDict(result, preserving_proto_field_name=True),
        }
        if options.verify:
            record["verify"] = await verify_row(prompt, result, row.get("foil"), options, saliency)
    except SeqsalError as error:
        record["error"] = {"code": error.code.name, "field": error.field, "message": error.message}
    return record


async def verify_row(
    prompt: str,
    explained: saliency_pb2.SaliencyResponse,
    foil: str | None,
    options: BatchOptions,
    saliency: AsyncSaliencyClient,
) -> dict[str, Any]:
    """Each method's Verify result (seqsal.verification.record), or its error, by method name."""
    out: dict[str, Any] = {}
    target_ids = [t.id for t in explained.tokens if t.part == common_pb2.TARGET]
    for scores in explained.scores:
        name = common_pb2.Method.Name(scores.method)
        problem = saliency_request(
            prompt=prompt,
            target_token_ids=target_ids,
            methods=[scores.method],
            foil=foil,
            granularity=options.granularity,
            custom_regex=options.custom_regex,
            model=options.model,
            priority=saliency_pb2.PRIORITY_BACKGROUND,
        )
        try:
            out[name] = verification.record(await saliency.verify(verify_request(problem=problem)))
        except SeqsalError as error:
            out[name] = {"error": {"code": error.code.name, "field": error.field, "message": error.message}}
    return out


async def run_batch(
    input_path: Path,
    output_path: Path,
    options: BatchOptions,
    *,
    saliency_address: str,
    inference_address: str | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int, int]:
    """Explain every row not yet in ``output_path``; returns (written, failed, skipped)."""
    rows = list(read_rows(input_path))
    seen: set[str] = set()
    for row_id, _ in rows:
        if row_id in seen:
            raise InvalidArgumentError(
                f"{input_path}: id {row_id!r} appears twice; ids must be unique", field="id"
            )
        seen.add(row_id)
    finished = done_ids(output_path)
    todo = [(i, r) for i, r in rows if i not in finished]
    skipped = len(rows) - len(todo)
    written = failed = 0
    semaphore = asyncio.Semaphore(options.concurrency)
    lock = asyncio.Lock()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # a service that is not up fails the batch at once; once it has answered, a call waits out a
    # restart of its server (within its deadline) instead of writing the row as an error
    for client_class, address in (
        (AsyncSaliencyClient, saliency_address),
        (AsyncInferenceClient, inference_address),
    ):
        if address:
            async with client_class(address, timeout=PROBE_TIMEOUT_S) as probe:
                try:
                    await probe.list_models()
                except UnavailableError:
                    raise
                except SeqsalError:  # it answers: each row reports what goes wrong (a bad token...)
                    pass
    async with AsyncSaliencyClient(saliency_address, retry=RIDE_OUT_RESTARTS) as saliency:
        inference = (
            AsyncInferenceClient(inference_address, retry=RIDE_OUT_RESTARTS) if inference_address else None
        )
        try:
            with output_path.open("a", encoding="utf-8") as out:

                async def one(row_id: str, row: dict[str, Any]) -> None:
                    nonlocal written, failed
                    async with semaphore:
                        record = await explain_row(row_id, row, options, saliency, inference)
                    async with lock:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                        out.flush()
                        written += 1
                        failed += "error" in record
                        if on_progress:
                            on_progress(written, len(todo))

                await asyncio.gather(*(one(i, r) for i, r in todo))
        finally:
            if inference is not None:
                await inference.close()
    return written, failed, skipped
