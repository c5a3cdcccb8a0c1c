"""Entry points: thin absl programs over the library (`python -m scripts.<name> --help`)."""
