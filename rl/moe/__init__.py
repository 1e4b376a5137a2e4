"""Mixture-of-Experts support: routing capture in the engine, routing replay (R2/R3) and MoE metrics in the
trainer (`rl.moe.replay`)."""
