"""The on-disk contract of a latent cache: layout, records, formats, commit log, duplicate index."""
