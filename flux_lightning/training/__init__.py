"""Training: the LightningModule, the flow-matching math, rollout, optimizers, the non-finite
guard, RNG streams, the stop flag. No Hydra."""
