"""Data, from files to micro-batches: record formats, rendering to tokens, the tokenized cache, batching."""
