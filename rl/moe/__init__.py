"""Mixture-of-Experts support: routing capture in the engine, routing replay (R2/R3) and MoE metrics in the
trainer (`rl.moe.replay`)."""

# The router load-balancing loss's default weight in RL (why 0: rl.moe.replay's docstring). Here, not in
# rl.moe.replay, so that the stage configs import without torch (a config error is reported in a fraction of a
# second).
DEFAULT_AUX_COEF = 0.0
