"""Start-up check of the versions llmstack is tested with (torch/triton skew breaks installs)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from llmstack.errors import UserError

# package -> (lowest tested, first untested major.minor); pyproject.toml states the same ranges.
# torch 2.5 is the floor: attention calls scaled_dot_product_attention(enable_gqa=...), new in 2.5.
TESTED = {"torch": ((2, 5), (2, 15)), "triton": ((3, 1), (3, 10)), "transformers": ((4, 45), (6, 0)),
          "safetensors": ((0, 4), (1, 0))}
WHY_FLOOR = {"torch": "scaled_dot_product_attention(enable_gqa=...) arrived in 2.5"}


def _major_minor(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_versions(required=("torch", "safetensors")) -> dict:
    found = {}
    for pkg, (lo, hi) in TESTED.items():
        try:
            v = version(pkg)
        except PackageNotFoundError:
            if pkg in required:
                raise UserError(f"{pkg} is not installed; run `make install` (tested {pkg} >= {lo[0]}.{lo[1]})") from None
            continue
        mm = _major_minor(v)
        if not (lo <= mm < hi):
            why = f" ({WHY_FLOOR[pkg]})" if mm < lo and pkg in WHY_FLOOR else ""
            raise UserError(f"{pkg} {v} is outside the tested range >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}{why}; "
                            f"install a tested version (see pyproject.toml)")
        found[pkg] = v
    return found
