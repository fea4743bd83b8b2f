"""Data: dataset readers, safe image paths and decoding, and the synthetic pedestrian world."""
