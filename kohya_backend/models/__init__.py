"""Single-file checkpoint loading, family detection, tokenizers and hashing."""
