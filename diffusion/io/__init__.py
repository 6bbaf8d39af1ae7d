"""Files: weights (safetensors, never pickled), the atomic write-then-rename, and the VAE folder."""
