"""Validates bazaar's contract documents against the specifications' own schemas.

usage: validate.py ASYNCAPI_META_SCHEMA OPENAPI_FILE... -- ASYNCAPI_FILE...

OpenAPI documents are checked by openapi-spec-validator (OpenAPI 3.1's schema and
rules); AsyncAPI documents against AsyncAPI 3.0.0's JSON Schema from @asyncapi/specs. A
deliberately broken copy of each must be refused too, so the check cannot pass vacuously.
Prints one line per document and exits non-zero on the first problem.
"""
import copy
import json
import sys

import jsonschema
from openapi_spec_validator import validate as validate_openapi


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main():
    meta_path, *rest = sys.argv[1:]
    split = rest.index("--")
    openapi_files, asyncapi_files = rest[:split], rest[split + 1:]
    asyncapi = jsonschema.Draft7Validator(load(meta_path))
    for path in openapi_files:
        doc = load(path)
        if doc.get("openapi") != "3.1.0":
            sys.exit(f"{path}: openapi is {doc.get('openapi')!r}, not 3.1.0")
        validate_openapi(doc)
        broken = copy.deepcopy(doc)
        del broken["info"]
        try:
            validate_openapi(broken)
        except Exception:
            pass
        else:
            sys.exit(f"{path}: a copy without `info` was accepted; the validator checks nothing")
        print(f"{path}: valid OpenAPI 3.1 ({len(doc['paths'])} paths)")
    for path in asyncapi_files:
        doc = load(path)
        errors = sorted(asyncapi.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            sys.exit(f"{path}: " + "; ".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:5]))
        broken = copy.deepcopy(doc)
        broken["operations"]["broken"] = {"action": "publish"}
        if asyncapi.is_valid(broken):
            sys.exit(f"{path}: an operation with action `publish` was accepted; the validator checks nothing")
        print(f"{path}: valid AsyncAPI 3.0 ({len(doc['components']['messages'])} messages)")


main()
