"""Which model a call that names none gets: ``--default-model auto`` chooses it per machine.

Candidates are the LiteMedSAM variants present in the model repository (each written by
``python -m export`` only if it passed its guard) that this CPU runs natively:

* ``medsam_lite`` (fp32): always;
* ``medsam_lite_int8`` and ``medsam_lite_int8_static``: with ``avx512_vnni`` or ``avx_vnni`` in
  ``/proc/cpuinfo``'s flags;
* ``medsam_lite_bf16``: with ``avx512_bf16`` or ``amx_bf16`` (without them OpenVINO computes
  it in fp32: correct, never faster).

At start-up, after warm-up, the gateway times ``--default-model-runs`` encoder runs of every
candidate through its backend's ``infer`` (embedded or Triton, candidates interleaved, best run
of each) and the fastest wins; the choice and the times are logged and shown in ListModels
(``is_default``, and the chosen model's description says why). When measuring is not possible
(one candidate, ``--default-model-runs 0``, or the backend fails a timed run) the documented
:data:`PREFERENCE` among the candidates decides, and the log says so. Any other value of
``--default-model`` is a model name and means exactly that model. The CPU flags are the gateway
host's: for a Triton server on another machine, pin the model by name.

No I/O but :func:`cpu_flags`; the timing itself is the gateway's (it holds the backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping

AUTO = "auto"
FP32, INT8, BF16 = "medsam_lite", "medsam_lite_int8", "medsam_lite_bf16"
INT8_STATIC = "medsam_lite_int8_static"
VNNI = ("avx512_vnni", "avx_vnni")
# model -> CPU flags of which one is needed to run it natively (empty: every CPU)
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    FP32: (),
    INT8: VNNI,
    BF16: ("avx512_bf16", "amx_bf16"),
    INT8_STATIC: VNNI,
}
# The order when nothing was measured: static INT8, BF16, INT8, fp32 (their speed order where
# they run natively; issue 14 measured 337 / 421 / 725 ms per new image for BF16 / INT8 / fp32
# side by side on one machine, and the static INT8 encoder ~0.75-0.8x BF16's time).
PREFERENCE: tuple[str, ...] = (INT8_STATIC, BF16, INT8, FP32)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags of this machine (x86 ``flags``, Arm ``Features``); empty when unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def runs_natively(model: str, flags: Collection[str]) -> bool:
    needed = NATIVE_FLAGS.get(model)
    return needed is not None and (not needed or any(f in flags for f in needed))


def candidates(present: Collection[str], flags: Collection[str]) -> list[str]:
    """The LiteMedSAM variants of ``present`` that this CPU runs natively, in :data:`PREFERENCE` order."""
    return [m for m in PREFERENCE if m in present and runs_natively(m, flags)]


@dataclass(frozen=True)
class Choice:
    """The default model and why: ``measured``: chosen on ``seconds`` (best encoder run per
    candidate) rather than by the documented preference or a pin."""

    model: str
    reason: str
    measured: bool = False
    seconds: Mapping[str, float] = field(default_factory=dict)


def _skipped(present: Collection[str], flags: Collection[str]) -> str:
    out = [f"{m} (this CPU has none of {', '.join(NATIVE_FLAGS[m])})"
           for m in PREFERENCE if m in present and not runs_natively(m, flags)]
    return f"; not run natively here: {', '.join(out)}" if out else ""


def choose(requested: str, present: Collection[str], flags: Collection[str],
           seconds: Mapping[str, float] | None = None, unmeasured_because: str = "") -> Choice:
    """The default model.

    ``requested``: ``--default-model`` (:data:`AUTO` or a name, which wins as given);
    ``present``: the servable models; ``seconds``: the best measured encoder run of each
    candidate, or ``None`` when not measured (``unmeasured_because`` says why). Raises
    ``ValueError`` for ``auto`` with no LiteMedSAM variant and more than one model.
    """
    if requested != AUTO:
        return Choice(requested, "pinned by --default-model")
    pool = candidates(present, flags)
    skipped = _skipped(present, flags)
    if not pool:
        if len(present) == 1:
            (only,) = present
            return Choice(only, "the only model in the repository")
        raise ValueError(f"--default-model auto chooses among the LiteMedSAM variants {', '.join(PREFERENCE)}, and "
                         f"the repository has none of them natively run here (it has {', '.join(sorted(present))}); "
                         "pass --default-model NAME")
    if len(pool) == 1:
        return Choice(pool[0], f"the only candidate this CPU runs natively{skipped}")
    timed = {m: float(seconds[m]) for m in pool if seconds and m in seconds}
    if len(timed) == len(pool):
        best = min(pool, key=lambda m: (timed[m], pool.index(m)))
        times = ", ".join(f"{m} {1000 * timed[m]:.0f} ms" for m in sorted(pool, key=timed.__getitem__))
        return Choice(best, f"fastest measured encoder on this machine ({times}){skipped}", True, timed)
    why = unmeasured_because or "not measured"
    return Choice(pool[0], f"documented preference {' > '.join(PREFERENCE)} ({why}){skipped}")
