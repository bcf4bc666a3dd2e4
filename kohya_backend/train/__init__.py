"""The training loop and its parts: noise, optimizers, events, state."""
