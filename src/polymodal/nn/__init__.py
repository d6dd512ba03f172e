"""Building blocks: attention, Transformer, per-modality encoders."""
