"""taps_cl.strategies."""
