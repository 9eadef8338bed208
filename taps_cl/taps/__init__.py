"""taps_cl.taps."""
