"""Operator and user commands (argparse)."""
