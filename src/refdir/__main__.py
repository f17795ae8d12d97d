"""``python -m refdir``: the command line, as the ``refdir`` script runs it."""

from refdir.cli import main

if __name__ == "__main__":
    main()
