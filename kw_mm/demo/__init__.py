"""Embedded demo data (synthetic shapes)."""
