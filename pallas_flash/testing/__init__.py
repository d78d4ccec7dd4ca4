"""Helpers for testing and measuring attention: named shapes (``shapes``)."""
