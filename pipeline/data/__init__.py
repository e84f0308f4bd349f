"""Corpus preparation on Ray Data (list -> read + tokenize in an actor pool -> token files, the packed
cache), random access to its blocks by sample id, and the tick-addressed sample order."""

from pipeline.data.bad_records import BadRecordError, NoUsableDocuments
from pipeline.data.prepare import CorruptCache, PreparedData, prepare, prepare_data, prepare_model

__all__ = ["BadRecordError", "CorruptCache", "NoUsableDocuments", "PreparedData", "prepare", "prepare_data",
           "prepare_model"]
