"""The bottom layer: the vocabulary every other layer shares (the domain errors, the
clock and the one timestamp format). It imports nothing of the gateway."""
