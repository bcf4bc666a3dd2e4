"""Train Management's bundled, kohya-compatible LoRA trainer for SD 1.5 and SDXL."""

__version__ = "0.1.0"
