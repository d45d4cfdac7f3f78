"""Fixtures for the real docker service (being written)."""
