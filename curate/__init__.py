"""Data curation: score pairs by cross-modal relevance, select the decisive subset, inspect both."""
