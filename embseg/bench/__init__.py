"""``embseg bench``: memory and speed of the ESS head against the softmax baseline as the class
count grows, and the throughput of the dataset build and of the training input pipeline.

Every memory/speed point runs in a process of its own, so one point's allocations never
inflate another's peak: on CUDA a fresh interpreter, whose peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU a child forked
from a server that has imported torch once (:class:`PointServer`), whose peak is its own peak
resident set size. A point that does not fit (CUDA out-of-memory, or the CPU address-space
cap) is recorded with a null peak.

The package, one module per part around a small core:

- ``core``: what to measure (:class:`BenchSettings`, :func:`settings_for`), the measurement
  inside a point's process (:func:`_measure`), the shared formatting, and :class:`Part`;
- ``points``: the point processes (:func:`run_point`, :class:`PointServer`);
- ``memory``, ``loss``, ``build``, ``loader``: the parts, each with its points, its report
  section and its goals;
- ``parts``: the registry (:data:`PART_MODULES`), the order parts run and report in;
- ``report``: goals, failed points, markdown and the files written after every point;
- ``run``: :func:`run_bench` and the command, :func:`cli_bench`.

Adding a part (say ``knn``):

1. Write ``embseg/bench/knn.py`` with the part's measurement, a ``run(ctx: PartRun)`` that
   stores its figures in ``ctx.result`` (through ``ctx.timed(name, fn)``; ``ctx.save()``
   after a slow step), a ``markdown(result)`` section and, if it has any, ``goals(result)``,
   each returning nothing when the result lacks the part's figures; then
   ``PART = Part(name="knn", run=run, results={"knn": None}, markdown=markdown,
   goals=goals)``. Work that must run in a point process of its own is a point kind:
   ``points={"knn": _knn_point}`` and ``ctx.run_point(spec)`` with ``spec["kind"] == "knn"``.
   Import heavy or optional libraries inside functions: ``import embseg.bench`` must stay
   light (the GPU machine has no pipeline packages).
2. Register it: add ``"knn"`` to :data:`embseg.bench.parts.PART_MODULES`.

Its sizes, when they differ between ``--quick`` and ``--gpu-sizes``, are fields of
:class:`BenchSettings` (the configuration stays in one place); tests/test_bench.py shows how
a part is tested without timing.
"""

# Every name of the former embseg/bench.py stays importable as embseg.bench.NAME, the
# private ones too (tests and callers use some): hence the noqa on the imports.
from embseg.bench.build import bench_build
from embseg.bench.core import (  # noqa: F401
    CLASS_COUNTS,
    GLIBC_M_MMAP_THRESHOLD,
    GLIBC_M_TRIM_THRESHOLD,
    MAX_MEASURED_STEPS,
    MEASURE_SECONDS,
    POINT_ENV,
    POINT_TIMEOUT_S,
    UNTIMED_STEP_MAX_SECONDS,
    BenchSettings,
    Goal,
    Part,
    PartRun,
    StepSetting,
    _allocator_keeps_freed_memory,
    _alternating_rounds,
    _fmt_bytes,
    _fmt_peak,
    _fmt_seconds,
    _is_oom,
    _limit_address_space,
    _load_lines,
    _loss_steps,
    _mapped_file_rss_bytes,
    _mapped_files_lines,
    _measure,
    _measured_fields,
    _peak_rss_bytes,
    _point,
    _proc_status_bytes,
    _ratio,
    _rounds_note,
    _row,
    _step_measure_seconds,
    _timed_call,
    _without_mapped_files,
    device_name,
    settings_for,
    settings_record,
    software_versions,
)
from embseg.bench.loader import (  # noqa: F401
    _drop_from_page_cache,
    _storage_read_rates,
    bench_loader,
)
from embseg.bench.loss import _loss_point, bench_loss  # noqa: F401
from embseg.bench.memory import (  # noqa: F401
    _memory_goals,
    _memory_notes,
    _missing_ratio,
    _step_pair_point,
    _step_point,
    _training_step,
    bench_memory,
    bench_step_pairs,
    class_table_floor_bytes,
    plot,
    softmax_ess_ratio,
    softmax_ess_ratio_without_mapped_files,
    step_time_pair,
)
from embseg.bench.parts import PART_MODULES, PARTS, REGISTRY, point_kinds
from embseg.bench.points import (  # noqa: F401
    PointError,
    PointServer,
    _point_result,
    _recorded,
    _run_point_child,
    run_point,
)
from embseg.bench.report import (  # noqa: F401
    _write_outputs,
    failed_points,
    goals,
    to_markdown,
)
from embseg.bench.run import check_parts, cli_bench, run_bench

__all__ = [
    "CLASS_COUNTS", "MAX_MEASURED_STEPS", "MEASURE_SECONDS", "PARTS", "PART_MODULES",
    "POINT_ENV", "POINT_TIMEOUT_S", "REGISTRY", "UNTIMED_STEP_MAX_SECONDS", "BenchSettings",
    "Goal", "Part", "PartRun", "PointError", "PointServer", "StepSetting", "bench_build",
    "bench_loader", "bench_loss", "bench_memory", "bench_step_pairs", "check_parts",
    "class_table_floor_bytes", "cli_bench", "device_name", "failed_points", "goals", "plot",
    "point_kinds", "run_bench", "run_point", "settings_for", "settings_record",
    "softmax_ess_ratio", "softmax_ess_ratio_without_mapped_files", "software_versions",
    "step_time_pair", "to_markdown",
]
