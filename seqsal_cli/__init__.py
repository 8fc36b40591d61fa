"""The application: the ``seqsal`` command (serve, ``seqsal up``, generate, saliency, verify, batch,
report) on top of the client (:mod:`seqsal`), the servers and the server kit."""
