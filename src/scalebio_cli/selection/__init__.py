"""Per-record selection for `scalebio select`: the paper's baselines RHO-loss and LESS (ALGORITHM.md).

pool.py loads the sources and validation sets and streams per-record losses through the data path every stage
uses (data/tokens/render.py's masking, train/losses.ResponseLoss: no full-logit tensors); rho_loss.py and less.py turn
them, or per-record LoRA gradients (projection.py), into one score per record. stages/select.py keeps the top N.
"""
