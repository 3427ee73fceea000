"""Former home of the cache writers; they live in `latentcache.cache` now (kept for imports)."""

from .cache.formats.parquet import column_to_numpy, fixed_shape_tensor, nested_lists
from .cache.writer import ERRORS_SCHEMA, NONFINITE_REASON, parquet_bytes

fixed_shape_tensor_array = fixed_shape_tensor
nested_list_array = nested_lists

__all__ = [
    "ERRORS_SCHEMA",
    "NONFINITE_REASON",
    "column_to_numpy",
    "fixed_shape_tensor_array",
    "nested_list_array",
    "parquet_bytes",
]
