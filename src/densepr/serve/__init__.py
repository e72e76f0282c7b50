"""Serving over HTTP: ``densepr serve``.
"""
