"""Mixtures compared as a paired experiment (`scalebio compare`): mixes, cells and their keys, cost, the summary."""
