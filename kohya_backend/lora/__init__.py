"""LoRA networks over kohya's target modules, and kohya-format saving."""
