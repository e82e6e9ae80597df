"""Groups within sources (`scalebio group`): features from the model, clusters, the grouped file."""
