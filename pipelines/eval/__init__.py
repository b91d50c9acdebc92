"""Distributed evaluation and batch inference."""
