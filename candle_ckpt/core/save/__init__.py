"""The save path: deciding at each epoch end whether to save and what to keep, and the
crash-consistent protocol that writes one epoch."""
