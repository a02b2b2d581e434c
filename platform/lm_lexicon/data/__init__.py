"""Data layer: the record type, loaders for each dataset format, prompt templates and the embedded corpus."""
from lm_lexicon.data.prompts import format_prompt
from lm_lexicon.data.records import SPLITS, LoadError, LoadReport, Record, read_jsonl, write_jsonl

__all__ = ["Record", "LoadReport", "LoadError", "SPLITS", "format_prompt", "read_jsonl", "write_jsonl"]
