"""A tiny decoder-only language model built from multihead's pieces (`multihead.examples.tiny_lm`)."""

from multihead.examples.tiny_lm import main

if __name__ == "__main__":
    main()
