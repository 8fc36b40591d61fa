"""The inference service: generation and scoring over gRPC, on vLLM (or transformers, or a remote server)."""
