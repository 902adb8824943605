"""Strict JSON for every file and line llmstack writes: NaN and infinities become null, since
bare NaN is not JSON and breaks every other reader (jq, JavaScript, W&B exports)."""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
