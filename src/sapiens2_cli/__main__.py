"""``python -m sapiens2_cli`` runs the command line (also what torchrun launches)."""

from sapiens2_cli.cli import main

if __name__ == "__main__":
    main()
