"""The CLI's command bodies, one module per help panel; pipeline/cli.py merges them into one app."""
