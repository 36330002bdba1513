"""Readers for chat exporters, each built from that exporter's own writer code."""
