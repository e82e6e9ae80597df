"""Training machinery shared by the stages: process group, model loading, engines (plain/DDP, DeepSpeed ZeRO),
optimizer, LISA, losses, the bilevel step, checkpoints, stopping and the loop pieces both stages share."""
