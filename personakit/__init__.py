"""Shared helpers for the persona fine-tuning scripts (one module per concern)."""
