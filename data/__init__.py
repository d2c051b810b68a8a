"""What an example is and how it becomes tokens. `from data import load_examples, Example, NONE, render_prompt`."""
from data.example import HOLDOUT_SPLITS, NONE, SPLITS, DataError, Example, holdout, render_prompt

SPECS = "acord:DIR, cuad:DIR, jsonl:FILE or synthetic"


def load_source(spec: str, split: str | None = None, **opts) -> tuple[list[Example], dict]:
    """(examples, loader notes) for a data SPEC. Answers are not yet validated (see data.validate). split "fit"
    and "calib" are the two parts of the train split (data.example.holdout)."""
    if split in HOLDOUT_SPLITS:
        examples, notes = load_source(spec, "train", **opts)
        part = holdout(examples, split, notes.get("holdout_units"))
        if not part:
            raise DataError(f"{spec}: the train split has no examples for its {split!r} part")
        return part, {**notes, "holdout": {"part": split, "examples": len(part), "of_train": len(examples)}}
    if split is not None and split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS + HOLDOUT_SPLITS)}")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic" and not arg:
        from data.synthetic import load
        return load(split, **_checked(load, opts, kind))
    if kind in ("acord", "cuad", "jsonl") and arg:
        import importlib
        load = importlib.import_module(f"data.{kind}").load
        return load(arg, split, **_checked(load, opts, kind))
    raise DataError(f"unknown data spec {spec!r}; use {SPECS}")


def _checked(fn, opts: dict, kind: str) -> dict:
    import inspect

    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise DataError(f"unknown option(s) {bad} for {kind} data; allowed: {allowed}")
    return opts


def load_examples(spec: str, split: str | None = None, **opts) -> list[Example]:
    """Examples for spec, split None = all splits. Use data.validate.load_validated to also check alignment."""
    return load_source(spec, split, **opts)[0]


__all__ = ["Example", "NONE", "SPLITS", "DataError", "render_prompt", "load_examples", "load_source"]
