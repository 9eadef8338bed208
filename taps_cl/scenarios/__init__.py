"""taps_cl.scenarios."""
