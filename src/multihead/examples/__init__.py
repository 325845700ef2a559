"""The reference page's five examples (page_examples.py), then more."""
