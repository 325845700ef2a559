"""The reference page's five examples (they live in the package: `multihead.examples.page_examples`,
so `python -m multihead demo` runs them from an installed wheel too)."""

from multihead.examples.page_examples import main

if __name__ == "__main__":
    main()
