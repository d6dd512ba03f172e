"""Training: recipes, the generic Lightning module, and the run that ties them together."""
