"""The models stages load once per worker: teachers (synthesize), judges (build-dpo-pairs), encoders (VAE, text)."""
