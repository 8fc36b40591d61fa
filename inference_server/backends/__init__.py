"""Generation backends behind one abstract class (:class:`~inference_server.backends.base.Backend`)."""
