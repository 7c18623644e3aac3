"""Serving exported models over HTTP."""
