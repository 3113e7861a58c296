"""Backbones (local, hub, bundled offline, tiny random), LoRA attachment, per-task heads."""
