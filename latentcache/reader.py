"""Reading a cache back: see `latentcache.cache.reader` (kept for imports)."""

from .cache.reader import Cache, CacheError, CacheFile, LatentBlock

__all__ = ["Cache", "CacheError", "CacheFile", "LatentBlock"]
