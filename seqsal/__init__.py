"""seqsal: interactive prompt debugging with sequence saliency.

This package is the contract and the client, what another service installs to call the servers
(``pip install seqsal``: grpcio and protobuf, no torch): the generated gRPC stubs
(``seqsal.v1``), the clients, typed errors, retries, TLS, and what the UI and the CLI both show
(segmentation, colour scales, renderers). The servers are ``saliency_server`` and
``inference_server``, built on ``server_kit``; the UI is ``ui``; the ``seqsal`` command is
``seqsal_cli``.
"""

__version__ = "0.1.0"
