"""``python -m embedlens``: the command line (what torchrun and accelerate launch start with ``-m embedlens``)."""

from embedlens.cli import main

if __name__ == "__main__":
    main()
