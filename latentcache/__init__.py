"""latentcache: image corpora -> VAE latent caches, at dataset scale, with Ray Data and diffusers."""

__version__ = "0.1.0"
