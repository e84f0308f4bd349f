"""Ray Data corpus preparation: read -> tokenize (actor pool) -> pack -> parquet cache."""

from pipeline.data.bad_records import BadRecordError, NoUsableDocuments
from pipeline.data.prepare import PreparedData, prepare_data

__all__ = ["BadRecordError", "NoUsableDocuments", "PreparedData", "prepare_data"]
