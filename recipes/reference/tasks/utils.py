"""Loaders for the local Brownout tasks: JSONL files beside this module, so paths never depend
on the working directory (lm-eval does not resolve dataset_kwargs.data_files relative to a YAML)."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(name, **_):
    import datasets

    rows = [json.loads(line) for line in open(HERE / name, encoding="utf-8")]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_brownout_ppl(**kw):
    return load_jsonl("brownout_ppl.jsonl")


def load_brownout_cont(**kw):
    return load_jsonl("brownout_cont.jsonl")


def load_brownout_cloze(**kw):
    return load_jsonl("brownout_cloze.jsonl")
