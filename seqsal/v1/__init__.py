"""Generated protobuf and gRPC stubs for package ``seqsal.v1`` (run ``make proto``)."""
