"""The Ray Train seam: engines (DeepSpeed / DDP / single process) and the worker loop."""
