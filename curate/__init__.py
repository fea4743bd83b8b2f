"""Data curation: score pairs by cross-modal relevance and select the decisive subset."""
