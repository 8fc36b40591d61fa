"""The server kit both seqsal servers are built on: the gRPC server and its one call-lifecycle
interceptor, bearer-token auth, rate and concurrency limits, metrics, tracing, logs, the model
registry, tokenisation, GGUF conversion and the packaged default model.

Installed with ``seqsal[server]`` (torch, transformers, Prometheus); a client needs none of it.
"""
