"""Evaluation and calibration data: JSONL records and their tokenization."""

from surgery.data.jsonl import Record, read_records, subsample
from surgery.data.tokenize import Encoded, encode_classification, encode_lm, pad_batch

__all__ = ["Encoded", "Record", "encode_classification", "encode_lm", "pad_batch",
           "read_records", "subsample"]
