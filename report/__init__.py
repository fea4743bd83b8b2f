"""Rendering primitives for HTML: self-contained pages, SVG charts and thumbnails (``html``).

Terminal output is rendered in :mod:`tbps.terminal`, next to the CLI that prints it.
"""
