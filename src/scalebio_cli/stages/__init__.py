"""One module per command. Stages never import each other; what they share lives in data/, train/ and results/."""
