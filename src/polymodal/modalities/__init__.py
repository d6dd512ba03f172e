"""Per-modality loading, validation, preprocessing and tokenisation."""
