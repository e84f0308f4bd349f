"""Corpus preparation on Ray Data: list -> read + tokenize (actor pool) -> pack (tasks) -> parquet cache."""

from pipeline.data.bad_records import BadRecordError, NoUsableDocuments
from pipeline.data.prepare import CorruptCache, PreparedData, prepare, prepare_data, prepare_model

__all__ = ["BadRecordError", "CorruptCache", "NoUsableDocuments", "PreparedData", "prepare", "prepare_data",
           "prepare_model"]
