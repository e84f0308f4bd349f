"""Ray Data corpus preparation: read -> tokenize (actor pool) -> pack -> parquet cache."""

from pipeline.data.prepare import PreparedData, prepare_data

__all__ = ["PreparedData", "prepare_data"]
