"""Decoding cache and generation."""
