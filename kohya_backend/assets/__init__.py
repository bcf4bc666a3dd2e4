"""Generators of tiny models, tokenizers and datasets for tests, the demo and benchmarks."""
