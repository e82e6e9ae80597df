"""What a run leaves behind for people and the next stage: metrics.jsonl and plots, and weights.json."""
