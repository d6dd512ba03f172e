"""The assistant: speech in and out, the output-modality router, the pipeline."""
