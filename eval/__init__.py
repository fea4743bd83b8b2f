"""Evaluation: text-to-image retrieval metrics, the evaluation protocol and search."""
