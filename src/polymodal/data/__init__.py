"""Data sets: folders and shards, streaming, collation, and the built-in shapes world."""
