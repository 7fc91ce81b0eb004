"""Reading, overriding, validating and writing params.yaml.

Validation happens here, once, before any stage runs; below this module everything
receives frozen ``schemas.params`` models, never dicts.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError as RuamelYAMLError

from schemas.params import Params
from shrinkflow.errors import ParamsError
from shrinkflow.io import write_text

PARAMS_FILE = "params.yaml"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"prune.sparsity=0.9"`` into (["prune", "sparsity"], 0.9); the value is YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set prune.sparsity=0.9")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
    return key.split("."), value


def _set(data: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ParamsError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def read_yaml(path: Path, kind: str = "params", help: str = "see `shrinkflow schema` or the README") -> dict[str, Any]:
    """Read a YAML mapping (a params or sweep file), with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{kind} file not found: {path} (create it: {help})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: YAML syntax error: {exc}") from exc
    if data is None:
        raise ParamsError(f"{path} is empty: write at least one section ({help})")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__} ({help})")
    return data


def _key_path(loc: Sequence[int | str], data: Any) -> str:
    """Render a pydantic error location as the key path the user wrote.

    Pydantic puts the union tag (e.g. 'magnitude') into locations of discriminated
    unions; those parts are not keys of the input, so they are dropped.
    """
    parts: list[str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            parts.append(f"[{part}]")
            node = node[part]
        elif i == len(loc) - 1:
            parts.append(str(part))
        # else: a union tag, not a key
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Most problems listed for one file: the rest are counted, not printed.
MAX_ERRORS = 20


def format_validation_error(exc: ValidationError, data: Any, source: str, kind: str = "params") -> str:
    errors = exc.errors()
    lines = [f"{source}: invalid {kind}:"]
    for err in errors[:MAX_ERRORS]:
        path = _key_path(err["loc"], data)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `shrinkflow schema` lists every key)"
        elif err["type"] == "union_tag_invalid":
            key = str(err["ctx"]["discriminator"]).strip("'()")
            path = f"{path}.{key}"
            msg = f"unknown value {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}"
        elif err["type"] == "literal_error":
            msg = f"got {_short(err['input'])}; {msg[0].lower()}{msg[1:]}"
        elif "input" in err and err["type"] not in {"missing", "value_error"}:
            msg = f"{msg} (got {_short(err['input'])})"
        lines.append(f"  - {path}: {msg}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS:,} more problems (fix these first)")
    return "\n".join(lines)


def validate(data: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, data, source)) from None


def check_inputs(params: Params, root: Path, source: str) -> None:
    """What the params name must be there, checked before any work: data files present and
    readable, model classes that import and are ``nn.Module`` subclasses, checkpoint files
    that exist and are model files. Paths are relative to the project root."""
    from shrinkflow.data import check_source
    from shrinkflow.io import model_file_kind

    problems = []
    if params.data.source in ("mnist", "npz") and not (root / params.data.path).exists():
        what = "the folder with the four MNIST IDX files" if params.data.source == "mnist" else "an .npz file with arrays X and y"
        problems.append(f"data.path: {params.data.path!r} does not exist; point it at {what}")
    else:
        problems += check_source(params.data, root)
    for key, spec in (("train_teacher.model", params.train_teacher.model), ("distill.student", params.distill.student)):
        if getattr(spec, "arch", None) == "module":
            problems += _check_class(spec.import_, f"{key}.import", root)
    ckpt = params.train_teacher.checkpoint
    if ckpt and not (root / ckpt).is_file():
        problems.append(f"train_teacher.checkpoint: {ckpt!r} does not exist; give a trained model file or null to train")
    elif ckpt and model_file_kind(root / ckpt) is None:
        problems.append(
            f"train_teacher.checkpoint: {ckpt!r} is not a model file (neither torch.save's format nor a packed .sfz)"
        )
    if problems:
        raise ParamsError(f"{source}: invalid params:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_class(target: str, key: str, root: Path) -> list[str]:
    """The class a params spec names (trusted: the params are the pipeline's own configuration) imports
    and is an ``nn.Module`` subclass; nothing is built."""
    import sys

    from shrinkflow.errors import InputError
    from shrinkflow.models import module_class

    # `arch: module` names classes importable from the project root (the stages' working directory).
    if str(Path(root).resolve()) not in sys.path:
        sys.path.insert(0, str(Path(root).resolve()))
    try:
        module_class(target, allow=[target], where=key)
    except InputError as exc:
        return [str(exc)]
    return []


def load_params(path: Path | str = PARAMS_FILE, overrides: Sequence[str] = (), root: Path | None = None) -> Params:
    """Read, override and validate a params file, and check the files it names.

    Args:
        root: project root that relative paths in the params refer to (default: cwd).
    """
    data = read_yaml(Path(path))
    for item in overrides:
        keys, value = parse_override(item)
        _set(data, keys, value, item)
    params = validate(data, str(path))
    check_inputs(params, Path(root) if root is not None else Path.cwd(), str(path))
    return params


def apply_to_params_file(target: Path, source: Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Make ``target`` (the params.yaml DVC reads) hold ``source`` plus ``overrides``.

    Validates first: on any error ``target`` is left exactly as it was. Comments and
    key order of the file are kept (ruamel round-trip), as ``dvc exp run -S`` does.
    """
    origin = Path(source) if source is not None else Path(target)
    params = load_params(origin, overrides, root=Path(target).parent)  # raises before anything is written
    if source is None and not overrides:
        return params
    rt = YAML()
    rt.preserve_quotes = True
    try:
        doc = rt.load(origin.read_text(encoding="utf-8"))
    except RuamelYAMLError as exc:  # pragma: no cover - read_yaml already parsed it
        raise ParamsError(f"{origin}: {exc}") from exc
    for item in overrides:
        keys, value = parse_override(item)
        _set(doc, keys, value, item)
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(Path(target), buf.getvalue())
    return params
