"""seqsal: interactive prompt debugging with sequence saliency.

The shared package: generated gRPC stubs (``seqsal.v1``), configuration,
errors, segmentation, cache, client and CLI. The services live in
``saliency_server`` and ``inference_server``; the UI in ``ui``.
"""

__version__ = "0.1.0"
