"""Attention kinds, chosen per layer by name (see registry.py)."""
