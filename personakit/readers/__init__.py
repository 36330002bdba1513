"""Readers of one chat exporter each, dispatched to by personakit.exports."""
