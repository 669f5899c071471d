"""A ``sitecustomize.py`` that makes chosen packages fail to import, as on a machine that lacks
them (the lent GPU machine has torch but not Ray, Prefect or the COCO/LVIS APIs)."""

from __future__ import annotations


def blocking_sitecustomize(blocked: set[str]) -> str:
    """Source of a ``sitecustomize.py`` whose import hook refuses ``blocked`` top-level names."""
    return f'''
import sys

BLOCKED = {sorted(blocked)!r}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None


sys.meta_path.insert(0, _Blocked())
'''
