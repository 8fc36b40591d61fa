"""How clients ride out a server restart: gRPC's own retry policy, in the channel's service config.

Every seqsal RPC is safe to repeat: none has a side effect beyond filling the saliency cache,
which stores the same entry whoever computes it. So every method of both services retries on
``UNAVAILABLE`` (server gone, connection reset, a draining server refusing new calls) with
exponential backoff and gRPC's jitter (±20 % per attempt), up to :attr:`RetryPolicy.attempts`
attempts (gRPC caps this at 5), all within the call's own deadline:

* ``Tokenize``, ``ListModels``, ``Saliency``, ``Score``: plain repeats.
* ``Generate``: greedy and seeded requests give the same answer again; an unseeded sample is a
  fresh sample, which is no worse, since the client never saw the lost one.
* ``SaliencyAllSegments``, ``GenerateStream``: gRPC retries a stream only until the server has
  sent its response headers (seqsal servers send them with the first message), so a stream cut
  after its first message fails with ``UNAVAILABLE``; calling again is cheap for
  ``SaliencyAllSegments``, whose finished segments are cached. The blocking (sync) clients do
  not retry streams at all (``retry_streams=False``): grpcio's sync stream, when the server
  drops it before its first message and the retries fail, never ends until its deadline (up to
  minutes; the asyncio stream ends), so there the caller is told ``UNAVAILABLE`` at once.

Other codes are never retried here: ``RESOURCE_EXHAUSTED`` means overload (retrying would
feed it; the caller decides, helped by the ``RetryInfo`` detail of rate limits), and
``DEADLINE_EXCEEDED`` / ``CANCELLED`` are the caller's own decision. A token bucket
(``retryThrottling``) stops retries while most calls of a channel fail, so an outage does not
multiply the load on the replicas that are left.

Retries alone cover outages of a few seconds (a replica rolling over, a dropped connection).
To wait for a server that is being restarted, use ``wait_for_ready=True``: a call made while
no server answers then waits (within its deadline) for one to come up instead of failing at
once. Interactive callers keep it off so that they can say at once that a service is down.
The reconnection backoff is bounded (:attr:`RetryPolicy.max_reconnect_backoff_s`) so that a
server that comes back is found within seconds rather than the two minutes of gRPC's default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from seqsal.v1 import inference_pb2, saliency_pb2

#: The services whose methods get the policy (every method of each).
SERVICES = (
    saliency_pb2.DESCRIPTOR.services_by_name["SaliencyService"],
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
)


def _duration(seconds: float) -> str:
    """A protobuf JSON duration (``"0.25s"``)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True)
class RetryPolicy:
    """The retry behaviour of a client's channel.

    Attributes:
        attempts: most attempts per call, the first included (gRPC caps it at 5; 1 = no retries).
        initial_backoff_s: delay before the first retry; each next one is ``multiplier`` times longer.
        max_backoff_s: longest delay between two attempts.
        multiplier: growth of the delay.
        wait_for_ready: calls wait (within their deadline) for a server instead of failing fast.
        max_reconnect_backoff_s: longest pause between two attempts to reconnect to a server.
    """

    attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    wait_for_ready: bool = False
    max_reconnect_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 5:
            raise ValueError(f"attempts = {self.attempts}: use 1..5 (gRPC caps retries at 5 attempts)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s or self.multiplier < 1:
            raise ValueError("backoff must be > 0, max_backoff_s >= initial_backoff_s and multiplier >= 1")

    def service_config(self, *, retry_streams: bool = True) -> dict[str, object]:
        """The service config (as a dict) that applies this policy to every seqsal method.

        ``retry_streams=False`` leaves the server-streaming methods out of the retries (a method's
        own entry wins over its service's in gRPC's service config).
        """
        method: dict[str, object] = {"name": [{"service": service.full_name} for service in SERVICES]}
        configs: list[dict[str, object]] = [method]
        if not retry_streams and self.attempts > 1:
            streams = [
                {"service": service.full_name, "method": m.name}
                for service in SERVICES
                for m in service.methods
                if m.server_streaming
            ]
            configs.append({"name": streams, **({"waitForReady": True} if self.wait_for_ready else {})})
        if self.wait_for_ready:
            method["waitForReady"] = True
        if self.attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.attempts,
                "initialBackoff": _duration(self.initial_backoff_s),
                "maxBackoff": _duration(self.max_backoff_s),
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return {
            "methodConfig": configs,
            # while more than half of a channel's recent calls fail, stop retrying
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }

    def channel_options(
        self, max_message_bytes: int, *, retry_streams: bool = True
    ) -> list[tuple[str, int | str]]:
        """Channel options that install the policy (``retry_streams``: see :meth:`service_config`)."""
        reconnect_ms = int(self.max_reconnect_backoff_s * 1000)
        config = self.service_config(retry_streams=retry_streams)
        return [
            ("grpc.enable_retries", 1 if self.attempts > 1 else 0),
            ("grpc.service_config", json.dumps(config)),
            # only ours: a DNS TXT record must not replace it
            ("grpc.service_config_disable_resolution", 1),
            # a request is retried only while it fits the retry buffer: let any allowed message fit
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(1000, reconnect_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms),
        ]


#: What every client uses unless told otherwise.
DEFAULT_RETRY = RetryPolicy()
