"""taps_cl.storage."""
