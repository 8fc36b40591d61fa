"""Generation on a remote OpenAI-compatible server (e.g. an existing vLLM deployment), over HTTP.

Same contract as the in-process backends, through the completions API
(``POST {openai_url}/completions``):

* the prompt goes out as token ids (``prompt: [int, ...]``), so the remote never
  re-tokenises; the local model directory still supplies the tokenizer (and the
  saliency server's weights), so it must hold the model the remote serves;
* each candidate's token ids come back exactly: vLLM's ``return_token_ids``, else
  the ``token_id:N`` strings that ``return_tokens_as_token_ids`` puts in ``logprobs``;
  the end-of-sequence token is among them, as with the other backends;
* ``logprobs: 0`` returns the chosen token's log-probability: vLLM's raw one,
  before temperature and top-p/top-k (its default ``--logprobs-mode raw_logprobs``);
* scoring asks for the log-probs of prompt + target as prompt tokens (vLLM's
  ``prompt_logprobs``; ``echo`` + ``logprobs`` where a server lacks it), one
  request for all targets.

HTTP failures become the service's typed errors: 400/422 → INVALID_ARGUMENT with
the remote's message and field; unreachable, 5xx → UNAVAILABLE naming the URL;
a timeout (``openai_timeout_s``) → DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import httpx

from inference_server.backends.base import Backend, CandidateDelta, GeneratedCandidate, SamplingParams
from inference_server.settings import InferenceSettings
from seqsal.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SeqsalError,
    UnauthenticatedError,
    UnavailableError,
)
from seqsal.v1 import inference_pb2
from server_kit.model_registry import ModelSpec

logger = logging.getLogger("seqsal.inference")

FINISH_REASONS = {"stop": inference_pb2.STOP, "length": inference_pb2.LENGTH, "abort": inference_pb2.ABORT}
TOKEN_ID_PREFIX = "token_id:"
CONNECT_TIMEOUT_S = 10.0


def _finish_reason(reason: str | None) -> int:
    return FINISH_REASONS.get(reason or "", inference_pb2.ABORT)


def _local_context(spec: ModelSpec) -> int:
    """The context length the local model's config.json states (2048 when it states none)."""
    try:
        config = json.loads((spec.path / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    config = config.get("text_config") or config
    limit = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    return int(limit)


class OpenAIBackend(Backend):
    """One model served by a remote OpenAI-compatible server; ``httpx.AsyncClient`` to it."""

    name = "openai"

    def __init__(self, spec: ModelSpec, tokenizer: Any, settings: InferenceSettings) -> None:
        if not settings.openai_url:
            raise FailedPreconditionError(
                "the openai backend needs the remote server's URL: pass --openai-url http://HOST:PORT/v1 "
                "(or set SEQSAL_OPENAI_URL), or choose another backend (--backend vllm or transformers)",
                field="openai_url",
            )
        self.spec = spec
        self.tokenizer = tokenizer
        self.settings = settings
        self.url = settings.openai_url.rstrip("/")
        self.remote_model = settings.openai_model or spec.id
        self.device_name = f"remote {self.url}"
        self.client: httpx.AsyncClient | None = None

    # --- life cycle --------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            headers = {"Accept": "application/json"}
            key: Any = self.settings.openai_api_key
            if hasattr(key, "get_secret_value"):  # should the setting become a SecretStr
                key = key.get_secret_value()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            timeout = self.settings.openai_timeout_s
            self.client = httpx.AsyncClient(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout)),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            )
        return self.client

    async def start(self) -> None:
        """Check the remote is reachable and serves the model; take its context length; warm it up."""
        models = await self._request_json("GET", "/models", what="list the served models")
        listed = models.get("data") if isinstance(models, dict) else None
        served = {str(m.get("id")): m for m in listed or [] if isinstance(m, dict)}
        if self.remote_model not in served:
            hint = (
                f"set SEQSAL_OPENAI_MODEL to the remote's name for model {self.spec.id!r}"
                if self.settings.openai_model is None
                else "fix SEQSAL_OPENAI_MODEL"
            )
            raise FailedPreconditionError(
                f"the server at {self.url} does not serve model {self.remote_model!r}; it serves "
                f"{sorted(served)}: {hint} (the remote must serve the same weights and tokenizer as the "
                f"local directory {self.spec.path})",
                field="openai_model",
            )
        remote_len = served[self.remote_model].get("max_model_len")
        context = (
            int(remote_len) if isinstance(remote_len, int) and remote_len > 0 else _local_context(self.spec)
        )
        if self.settings.max_model_len:
            context = min(context, self.settings.max_model_len)
        self.context = context
        # one token with logprobs: checks token-id prompts work, and pays any first-request cost now
        await self.generate([self.tokenizer.eos_token_id or 0], SamplingParams(max_tokens=1))
        logger.info("remote model %r at %s: context %d", self.remote_model, self.url, self.context)

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    # --- HTTP --------------------------------------------------------------------------------------

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> SeqsalError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return DeadlineExceededError(
                f"the OpenAI-compatible server at {self.url} did not answer within "
                f"{self.settings.openai_timeout_s:g} s (to {what}); raise SEQSAL_OPENAI_TIMEOUT_S or ask for "
                "fewer tokens"
            )
        return UnavailableError(
            f"cannot reach the OpenAI-compatible server at {self.url} (to {what}: "
            f"{type(exc).__name__}: {exc or 'no detail'}); check it is running and that --openai-url "
            "(SEQSAL_OPENAI_URL) is right, e.g. http://HOST:8000/v1"
        )

    @staticmethod
    def _remote_error(body: bytes) -> tuple[str, str | None]:
        """The message and parameter name of an error body (OpenAI's and vLLM's shapes alike)."""
        text = body.decode("utf-8", errors="replace").strip()
        try:
            data = json.loads(text)
        except ValueError:
            return text[:500] or "no detail", None
        if isinstance(data, dict):
            error = data.get("error", data)
            if isinstance(error, dict):
                message = error.get("message") or error.get("detail") or text
                param = error.get("param")
                return str(message)[:1000], str(param) if param else None
            if isinstance(error, str):
                return error[:1000], None
        return text[:500], None

    def _raise_http_error(self, status: int, body: bytes, what: str) -> NoReturn:
        message, param = self._remote_error(body)
        where = f"the server at {self.url} (to {what})"
        if status in (400, 422):
            raise InvalidArgumentError(f"{where} rejected the request: {message}", field=param)
        if status == 401:
            raise UnauthenticatedError(
                f"{where} refused the request as unauthenticated ({message}): set SEQSAL_OPENAI_API_KEY to "
                "an API key it accepts",
                field="openai_api_key",
            )
        if status == 403:
            raise PermissionDeniedError(f"{where} refused the API key: {message}", field="openai_api_key")
        if status == 404:
            hint = "" if self.url.endswith("/v1") else "; does --openai-url end in /v1?"
            raise FailedPreconditionError(f"{where} answered 404 Not Found: {message}{hint}")
        if status == 429:
            raise ResourceExhaustedError(f"{where} is at capacity (429): {message}; retry later")
        if status >= 500:
            raise UnavailableError(f"{where} failed with HTTP {status}: {message}")
        raise InternalError(f"{where} answered HTTP {status}: {message}")

    async def _request_json(self, method: str, path: str, *, what: str, payload: Any = None) -> Any:
        try:
            response = await self._client().request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from exc
        if response.status_code != 200:
            self._raise_http_error(response.status_code, response.content, what)
        try:
            return response.json()
        except ValueError as exc:
            raise InternalError(
                f"the server at {self.url} (to {what}) answered with something that is not JSON: "
                f"{response.text[:200]!r}"
            ) from exc

    async def _stream_json(self, path: str, payload: Any, *, what: str) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects of a server-sent-events response, up to ``data: [DONE]``."""
        try:
            async with self._client().stream("POST", path, json=payload) as response:
                if response.status_code != 200:
                    self._raise_http_error(response.status_code, await response.aread(), what)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, "event:" lines
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise InternalError(
                            f"the server at {self.url} (to {what}) streamed something that is not JSON: "
                            f"{data[:200]!r}"
                        ) from exc
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:  # vLLM reports errors met mid-stream this way
                        error = chunk["error"]
                        code = error.get("code") if isinstance(error, dict) else None
                        status = code if isinstance(code, int) and code >= 400 else 500
                        self._raise_http_error(status, json.dumps(chunk).encode(), what)
                    yield chunk
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from exc
        raise UnavailableError(f"the server at {self.url} ended the stream (to {what}) before [DONE]")

    # --- generation --------------------------------------------------------------------------------

    def _payload(self, prompt_ids: Sequence[int], params: SamplingParams, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.remote_model,
            "prompt": list(prompt_ids),
            "n": params.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 0,  # the chosen token's own logprob only
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "stream": stream,
        }
        if params.top_k > 0:
            payload["top_k"] = params.top_k
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.stop:
            payload["stop"] = list(params.stop)
        return payload

    def _tokens(self, choice: dict[str, Any]) -> tuple[list[int], list[float]]:
        """A choice's (new) token ids and their logprobs."""
        logprobs = choice.get("logprobs") or {}
        values = [float(v) if v is not None else float("-inf") for v in logprobs.get("token_logprobs") or []]
        ids = choice.get("token_ids")
        if ids is None:  # a server without return_token_ids: parse "token_id:N"
            try:
                ids = [int(t.removeprefix(TOKEN_ID_PREFIX)) for t in logprobs.get("tokens") or []]
            except (ValueError, AttributeError) as exc:
                raise InternalError(
                    f"the server at {self.url} returned logprob tokens that are not 'token_id:N' "
                    f"({exc}); it needs to support return_tokens_as_token_ids (vLLM does)"
                ) from exc
        ids = [int(i) for i in ids]
        if len(values) != len(ids):
            raise InternalError(
                f"the server at {self.url} returned {len(ids)} token ids but {len(values)} logprobs; "
                "it needs to support logprobs on completions (vLLM does)"
            )
        return ids, values

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[GeneratedCandidate]:
        result = await self._request_json(
            "POST", "/completions", what="generate", payload=self._payload(prompt_ids, params, stream=False)
        )
        candidates: dict[int, GeneratedCandidate] = {}
        for choice in result.get("choices") or []:
            ids, logprobs = self._tokens(choice)
            index = int(choice.get("index", 0))
            candidates[index] = GeneratedCandidate(
                index=index,
                token_ids=ids,
                logprobs=logprobs,
                finish_reason=_finish_reason(choice.get("finish_reason")),
            )
        if sorted(candidates) != list(range(params.n)):
            raise InternalError(
                f"the server at {self.url} returned candidates {sorted(candidates)} for n = {params.n}"
            )
        return [candidates[i] for i in range(params.n)]

    async def generate_stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[CandidateDelta]:
        payload = self._payload(prompt_ids, params, stream=True)
        finished: set[int] = set()
        async for chunk in self._stream_json("/completions", payload, what="generate (streaming)"):
            for choice in chunk.get("choices") or []:
                index = int(choice.get("index", 0))
                if not 0 <= index < params.n or index in finished:
                    continue
                ids, logprobs = self._tokens(choice)
                reason = choice.get("finish_reason")
                if reason:
                    finished.add(index)
                yield CandidateDelta(
                    index=index,
                    token_ids=ids,
                    logprobs=logprobs,
                    finish_reason=_finish_reason(reason)
                    if reason
                    else inference_pb2.FINISH_REASON_UNSPECIFIED,
                )
        for index in range(params.n):  # every candidate ends with a finish reason
            if index not in finished:
                yield CandidateDelta(index=index, finish_reason=inference_pb2.ABORT)

    # --- scoring -----------------------------------------------------------------------------------

    def _prompt_logprobs(self, choice: dict[str, Any], full: list[int], start: int) -> list[float]:
        """``log p(full[i] | full[:i])`` for ``i >= start``, from one choice of a scoring request."""
        rows = choice.get("prompt_logprobs")
        out: list[float] = []
        if rows is not None:  # vLLM: [None, {"<id>": {"logprob": ...}}, ...]
            for i in range(start, len(full)):
                entry = (rows[i] or {}).get(str(full[i])) if i < len(rows) else None
                if not isinstance(entry, dict) or entry.get("logprob") is None:
                    raise InternalError(
                        f"the server at {self.url} returned no prompt logprob for position {i}"
                    )
                out.append(float(entry["logprob"]))
            return out
        # echo: logprobs cover prompt + generated tokens, the first None
        logprobs = choice.get("logprobs") or {}
        values = logprobs.get("token_logprobs") or []
        tokens = logprobs.get("tokens") or []
        for i in range(start, len(full)):
            known = i < len(values) and i < len(tokens) and values[i] is not None
            if not known or tokens[i] != f"{TOKEN_ID_PREFIX}{full[i]}":
                raise InternalError(
                    f"the server at {self.url} returned no prompt logprobs; scoring needs vLLM's "
                    "prompt_logprobs or echo with logprobs and return_tokens_as_token_ids"
                )
            out.append(float(values[i]))
        return out

    async def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        fulls = [list(prompt) + list(target) for prompt, target in rows]
        payload = {
            "model": self.remote_model,
            "prompt": fulls,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "echo": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        result = await self._request_json("POST", "/completions", what="score", payload=payload)
        choices = {int(c.get("index", 0)): c for c in result.get("choices") or []}
        if sorted(choices) != list(range(len(fulls))):
            raise InternalError(
                f"the server at {self.url} returned choices {sorted(choices)} for {len(fulls)} prompts"
            )
        return [self._prompt_logprobs(choices[i], full, len(rows[i][0])) for i, full in enumerate(fulls)]
