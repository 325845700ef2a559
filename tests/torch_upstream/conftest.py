# PyTorch's fetched file runs through tests/test_torch_upstream.py (patched, with exclusions), never directly
collect_ignore_glob = ["vendor/*"]
