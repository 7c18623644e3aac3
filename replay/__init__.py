"""Datasets (synthetic, MovieLens-format) and writing them into the Kafka topics."""
