"""The JSON document ``polycos bench --json`` writes, as a JSON Schema, and a checker.

The schema (JSON Schema draft 2020-12) is :data:`SCHEMA`; :func:`validate`
checks a document against it with :mod:`jsonschema`.
``docs/benchmarks.md`` documents the same fields for people.
"""

from __future__ import annotations

from typing import Any

from polycos.bench._suites import ALLOCATORS, DEVICES, DTYPES, JAX_DISPATCH, KINDS, OPS

__all__ = ["RECORD", "SCHEMA", "validate"]

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}  # null: not finite (no round in common)
_POS = {"type": "number", "minimum": 0}
_POS_OR_NULL = {"type": ["number", "null"], "minimum": 0}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2}
_THREADS = {"type": "integer", "minimum": 1}
_SETTING = {"type": "string"}  # "all" or a positive integer as text
_STR_OR_NULL = {"type": ["string", "null"]}

RECORD: dict[str, Any] = {
    "type": "object",
    "required": [
        "name",
        "kind",
        "backend",
        "op",
        "shape",
        "dtype",
        "device",
        "threads",
        "threads_setting",
        "bytes",
        "call",
        "number",
        "warmup_s",
        "times_s",
        "median_s",
        "gbps",
        "x_floor",
        "speedup",
    ],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": list(KINDS)},
        "backend": _STR_OR_NULL,
        "op": {"enum": list(OPS)},
        "shape": _SHAPE,
        "dtype": {"enum": list(DTYPES)},
        "device": {"enum": list(DEVICES)},
        "threads": _THREADS,
        "threads_setting": _SETTING,
        "bytes": {"type": "integer", "minimum": 0},
        "call": {"type": "string"},
        "number": {"type": ["integer", "null"], "minimum": 1},
        "warmup_s": _POS,
        "times_s": {"type": "array", "items": _POS, "minItems": 1},
        "median_s": _POS,
        "gbps": _POS_OR_NULL,
        "x_floor": _NUM_OR_NULL,
        "speedup": {"type": "object", "additionalProperties": _NUM_OR_NULL},
        "page_faults": {"type": "number", "minimum": 0},
        "floor_parts": {
            "type": "object",
            "required": ["read", "write"],
            "additionalProperties": False,
            "properties": {
                "read": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "write": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            },
        },
    },
}

TARGET_ROW: dict[str, Any] = {
    "type": "object",
    "required": ["label", "target", "subject", "op", "dtype", "threads", "threads_setting",
                 "gate", "shape", "at_reference", "value", "per_size", "status"],
    "additionalProperties": False,
    "properties": {
        "label": {"type": "string"},
        "target": {"type": "string"},
        "subject": {"type": "string"},
        "op": {"enum": list(OPS)},
        "dtype": {"enum": list(DTYPES)},
        "threads": {"type": ["integer", "null"], "minimum": 1},
        "threads_setting": _SETTING,
        "gate": {"type": "boolean"},
        "shape": {"type": ["array", "null"], "items": {"type": "integer"}},
        "at_reference": {"type": ["boolean", "null"]},
        "value": _NUM_OR_NULL,
        "per_size": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["shape", "value"],
                "additionalProperties": False,
                "properties": {"shape": _SHAPE, "value": _NUM},
            },
        },
        "status": {"enum": ["met", "missed", "not measured"]},
    },
}

RUN: dict[str, Any] = {
    "type": "object",
    "required": ["threads", "threads_setting", "threads_by_library", "env", "isolated",
                 "duration_s", "loadavg", "kernel"],
    "additionalProperties": False,
    "properties": {
        "threads": _THREADS,
        "threads_setting": _SETTING,
        "threads_by_library": {"type": "object"},
        "env": {"type": "object", "additionalProperties": _STR_OR_NULL},
        "isolated": {"type": "boolean"},
        "jax_async_dispatch": {"type": ["boolean", "null"]},  # as set in the run; null: no JAX
        "duration_s": _POS,
        "loadavg": {"type": "array"},
        "kernel": {"type": "object", "required": ["available"]},
        "cpus": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "polycos bench results",
    "type": "object",
    "required": [
        "schema",
        "date",
        "duration_s",
        "command",
        "machine",
        "versions",
        "config",
        "reference_threads",
        "runs",
        "results",
        "skipped",
        "targets",
        "errors",
    ],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": "polycos-bench/2"},
        "date": {"type": "string"},
        "duration_s": _POS,
        "command": {"type": "array", "items": {"type": "string"}},
        "machine": {
            "type": "object",
            "required": ["platform", "processor", "cpu_count", "usable_cpus", "python", "gpus"],
            "properties": {
                "platform": {"type": "string"},
                "machine": {"type": "string"},
                "processor": {"type": "string"},
                "cpu_count": {"type": ["integer", "null"]},
                "usable_cpus": {"type": "integer", "minimum": 1},
                "python": {"type": "string"},
                "loadavg": {"type": ["array", "null"], "items": _NUM},
                "gpus": {"type": "array", "items": {"type": "string"}},
            },
        },
        "versions": {
            "type": "object",
            "required": ["polycos"],
            "additionalProperties": {"type": "string"},
        },
        "config": {
            "type": "object",
            "required": [
                "backends",
                "ops",
                "rowwise",
                "pairwise",
                "threads",
                "repeat",
                "min_time",
                "quick",
                "compile",
            ],
            "additionalProperties": False,
            "properties": {
                "backends": {"type": "array", "items": {"type": "string"}},
                "ops": {"type": "array", "items": {"enum": list(OPS)}},
                "rowwise": {"type": "array", "items": {"type": "array", "minItems": 3}},
                "pairwise": {"type": "array", "items": {"type": "array", "minItems": 4}},
                "threads": {"type": "array", "items": _SETTING, "minItems": 1},
                "repeat": {"type": "integer", "minimum": 1},
                "min_time": _POS,
                "quick": {"type": "boolean"},
                "compile": {"enum": ["all", "rowwise", "largest", "none"]},
                "slow": _POS,
                "slow_rounds": {"type": "integer", "minimum": 1},
                "isolate": {"type": "boolean"},
                "allocator": {"enum": list(ALLOCATORS)},
                "jax_dispatch": {"enum": list(JAX_DISPATCH)},
            },
        },
        "reference_threads": _SETTING,
        "runs": {"type": "array", "items": RUN},
        "results": {"type": "array", "items": RECORD},
        "skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["threads", "threads_setting", "device", "op", "shape", "dtype", "reason"],
                "additionalProperties": False,
                "properties": {
                    "threads": _THREADS,
                    "threads_setting": _SETTING,
                    "device": {"enum": [*DEVICES, None]},
                    "op": {"enum": [*OPS, None]},
                    "shape": {"type": ["array", "null"], "items": {"type": "integer"}},
                    "dtype": {"enum": [*DTYPES, None]},
                    "reason": {"type": "string"},
                },
            },
        },
        "targets": {"type": "array", "items": TARGET_ROW},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}

def validate(doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Errors of ``doc`` against ``schema`` (default :data:`SCHEMA`); empty when valid.

    A thin wrapper over :mod:`jsonschema` (draft 2020-12) that returns one
    message per violation, prefixed by its JSON path, in document order.

    Parameters
    ----------
    doc : object
        A parsed JSON document (``json.load``).
    schema : dict, optional
        A (sub)schema; the whole :data:`SCHEMA` by default.

    Returns
    -------
    list of str
        One message per violation, each starting with the JSON path.

    Examples
    --------
    >>> validate({"schema": "polycos-bench/2"})[0]
    "$: 'date' is a required property"
    >>> validate([1, "a"], {"type": "array", "items": {"type": "integer"}})
    ["$[1]: 'a' is not of type 'integer'"]
    """
    from jsonschema import Draft202012Validator

    checker = Draft202012Validator(SCHEMA if schema is None else schema)
    errors = sorted(checker.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{e.json_path}: {e.message}" for e in errors]
