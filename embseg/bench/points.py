"""Point processes: every memory/speed point of ``embseg bench`` runs in a process of its own.

On CUDA a fresh interpreter (:func:`run_point`); on CPU a child forked from a server that has
imported torch once (:class:`PointServer`). A point is a JSON spec whose ``kind`` names the
function that runs it; the parts declare their kinds in their :class:`~embseg.bench.core.Part`
(``points``). A point that does not fit (CUDA out-of-memory, or the CPU address-space cap) is
recorded with a null peak; one that fails otherwise raises :class:`PointError`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from embseg.bench.core import POINT_ENV, POINT_TIMEOUT_S, _is_oom, _limit_address_space
from embseg.forkserver import ForkServer, ForkServerExited


def _run_point_child(spec_json: str) -> None:
    """Subprocess entry: run one point and print its JSON result on the last line."""
    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        _limit_address_space(spec["cpu_memory_cap_gib"])
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from embseg.bench.parts import point_kinds  # the parts import this module

    runner = point_kinds()[spec["kind"]]
    try:
        result = runner(spec)
    except Exception as exc:  # noqa: BLE001 - OOM of any flavour is a result, not a crash
        if not _is_oom(exc):
            raise
        result = {"peak_bytes": None, "step_seconds": None, "oom": True}
    print(json.dumps(result))


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one point in a fresh interpreter; a crash for lack of memory counts as OOM."""
    code = ("import sys; from embseg.bench.points import _run_point_child; "
            "_run_point_child(sys.argv[1])")
    env = dict(os.environ, **POINT_ENV)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                          text=True, timeout=POINT_TIMEOUT_S, env=env)
    return _point_result(spec, proc.returncode, proc.stdout, proc.stderr)


class PointError(RuntimeError):
    """A point's process ended with an error other than running out of memory."""


def _point_result(spec: dict[str, Any], returncode: int, stdout: str, stderr: str
                  ) -> dict[str, Any]:
    """A finished point's JSON result; OOM for a kill or an out-of-memory error, else raise
    :class:`PointError` with the error's last line."""
    if returncode == 0 and stdout.strip():
        return json.loads(stdout.strip().splitlines()[-1])
    last_line = (stderr.strip().splitlines() or [""])[-1]  # MemoryError: also while importing
    if returncode < 0 or _is_oom(RuntimeError(stderr)) or last_line.startswith("MemoryError"):
        return {"peak_bytes": None, "step_seconds": None, "oom": True}
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    raise PointError(f"benchmark point {spec} failed: {last}")


def _recorded(run, spec: dict[str, Any], log) -> dict[str, Any]:
    """``run(spec)``, with a :class:`PointError` recorded as the point's result (null figures
    and ``error``) rather than raised: one point whose kernel fails (a GPU run is minutes of
    lent time) does not cost the points after it. The command reports such points at the end
    and exits 1."""
    try:
        return run(spec)
    except PointError as exc:
        log(f"error  {exc}")
        return {"peak_bytes": None, "step_seconds": None, "error": str(exc)}


class PointServer:
    """Runs CPU points, each in a child forked from one interpreter that has already
    imported torch and the model code (:class:`~embseg.forkserver.ForkServer`).

    A fresh interpreter per point spends ~2.5 s of a 2-core CPU on imports before its first
    step, about a minute of ``--quick``. numba is not imported in the server (the softmax
    points would carry its libraries). Use :func:`run_point` on CUDA.
    """

    def __init__(self) -> None:
        self._server = ForkServer("embseg.bench.points:_run_point_child",
                                  preload=("torch", "embseg.ess", "embseg.models"), env=POINT_ENV)

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """:func:`run_point` of ``spec`` in a forked child (same results, same errors)."""
        try:
            child = self._server.run(json.dumps(spec), timeout=POINT_TIMEOUT_S)
        except ForkServerExited as exc:
            raise RuntimeError(f"benchmark point {spec} failed: {exc}") from None
        return _point_result(spec, child.returncode, child.stdout, child.stderr)

    def close(self) -> None:
        """Stop the server and any child it is running."""
        self._server.close()

    def __enter__(self) -> PointServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
