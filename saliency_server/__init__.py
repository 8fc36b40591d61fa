"""The saliency service: teacher-forced gradient saliency over gRPC (PyTorch)."""
