"""CLI commands. Each module defines `register(subparsers)`; ORDER sorts them in --help."""
