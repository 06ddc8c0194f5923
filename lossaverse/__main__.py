"""`python -m lossaverse ...`: the command line, as the `lossaverse` script."""

from lossaverse.cluster.cli import main

if __name__ == "__main__":
    main()
