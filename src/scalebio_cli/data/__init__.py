"""Data, from files to micro-batches, in the order it flows: read/ (records where users keep them), tokens/
(rendered and tokenized, cached), batching (padded micro-batches), batch_plan (what each reweight step draws);
out/ holds what only sample, export and eval use."""
