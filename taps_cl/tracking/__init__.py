"""taps_cl.tracking."""
