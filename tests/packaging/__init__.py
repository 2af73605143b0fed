"""Packaging: the built wheel, installed without the checkout."""
