"""Fixtures live in plugin modules, one per concern."""
