"""``python -m sparsecc``: the ``sparsecc`` command line (see :mod:`sparsecc.cli`)."""

from sparsecc.cli import main

if __name__ == "__main__":
    main()
