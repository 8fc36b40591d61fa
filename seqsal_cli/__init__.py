"""The application: the ``seqsal`` command (serve, ``seqsal up``, tokenize, saliency, verify, report,
batch, models, model-path) on top of the client (:mod:`seqsal`), the servers and the server kit."""
