"""Fixtures for the real s3 service (being written)."""
