"""seqsal: interactive prompt debugging with sequence saliency.

The shared package: the contract (generated gRPC stubs, ``seqsal.v1``) and the client, the
server kit both servers use (settings, errors, the call lifecycle, admission, metrics,
tokenisation, segmentation, models) and the application (CLI, ``seqsal up``, batch). The
services live in ``saliency_server`` (with its result cache) and ``inference_server`` (with
its chat templates); the UI in ``ui``.
"""

__version__ = "0.1.0"
