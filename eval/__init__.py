"""Evaluation: text-to-image retrieval metrics, reports and search."""
