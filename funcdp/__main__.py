"""`python -m funcdp ...` runs the `funcdp` command line."""

from funcdp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
