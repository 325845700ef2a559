"""Benchmarks against torch.nn.MultiheadAttention: `python -m multihead bench --help`."""
