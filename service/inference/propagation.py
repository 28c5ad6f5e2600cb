"""3-D segmentation with a promptable 2-D model: anchors, interpolation, propagation.

A segment of a volume is defined by its *interactions*: boxes the user drew on some slices
(**anchors**), clicks on some slices and slice ranges the user erased. From them a **plan**
of pieces follows:

* each anchor slice is segmented with its own box; a slice the user clicked on is an anchor
  too (:class:`Clicks`): its box (the anchor's, else the bounding box of its mask when first
  clicked, else none) and every click on it, each click decoded with the previous round's
  low-resolution logits as the mask prompt (SAM's interactive loop, replayed from the box);
* between two neighbouring anchors (no erased slice between them) every slice is prompted
  with the hull of the two anchors' boxes (re-anchoring: corrected slices pull the slices
  between them back onto the structure);
* beyond the outermost anchors (up to the request's slice range, an erased slice or the
  volume's end) the mask is **propagated**: each next slice is prompted with the anchor's
  box and the previous slice's low-resolution logits as the mask prompt, and propagation
  stops by the :class:`Rules`: the mask vanished, its predicted IoU collapsed, its area
  jumped or collapsed, its mean image-embedding feature no longer resembles the anchor
  mask's (it left the structure), or the range ended.

The defaults of :class:`Rules` were chosen on the colin27 volume of ../shared/data/volumes
(numbers in their comments and in docs/EVALUATION_3D.md); the reviewers' held-out subjects
were not seen.

The algorithm is written *sans-IO*, like :class:`service.inference.predictor.SamPredictor`:
:func:`run_piece` is a generator that yields :class:`Embed` and :class:`Decode` requests and
receives their answers, so the gateway's async volume service (awaiting its backend), the
evaluation and the pseudo-labels of ``training/`` (synchronous, :func:`drive`) run exactly
the same steps. All boxes, clicks and masks here are in the volume's model orientation.
Whether the model takes clicks is checked where every prompt is: the driver's decode
(:func:`service.core.prompts.validate`: a model without point prompts refuses a
:class:`Clicks` anchor's first round with clicks with ``UnsupportedPrompt``, before any piece
beside that anchor runs).

Pieces are keyed by everything they depend on (:attr:`Piece.key`), so a refinement
recomputes only the pieces whose anchors, erased slices or bounds changed, and undo reuses
the results of the state it returns to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Mapping

import numpy as np

from service.core.domain import Box, Point, Prompt


@dataclass(frozen=True)
class Rules:
    """When propagation goes on to the next slice, and with which prompt.

    With ``tail_box="mask"`` the box of the next slice is the previous mask's bounding box
    grown on each side by ``margin`` of its side (at least ``min_margin_px`` input pixels,
    and the anchor's own offset, see ``anchor_offset``). A slice's mask is kept
    when its predicted IoU is at least ``min_iou``, its area at least ``min_area_px`` and
    within ``max_area_ratio`` of the previous slice's area (either way); otherwise
    propagation on that side stops before it.
    """

    margin: float = 0.1
    min_margin_px: float = 2.0
    min_iou: float = 0.3
    min_area_px: int = 4
    max_area_ratio: float = 3.0
    mask_prompt: bool = True          # the previous slice's low-res logits as mask_input
    interpolated_mask_prompt: bool = False
    # The next box is the previous mask's box moved out on each side by the anchor's offset
    # (the user's box side minus its mask's box side, at least the margin): when the model
    # answers the user's box with a mask smaller than the structure, propagation keeps
    # asking for the user's extent instead of shrinking slice after slice.
    anchor_offset: bool = True
    max_offset_frac: float = 1.0      # an offset at most this fraction of the box side
    # Stop where the mask's mean image-embedding feature has a cosine similarity below this
    # to the anchor mask's (the mask has left the structure the user boxed); 0: off.
    min_similarity: float = 0.7
    # How a tail's next box is made: "anchor" (the anchor's box, unchanged: the structure moves
    # little from slice to slice, and the model's own mask box drifts, shrinking to a blob or
    # growing into neighbours) or "mask" (the previous mask's box grown by the margin and the
    # anchor's offset). Measured on colin27's 14 structures, one box: mean 3-D Dice 0.472 with
    # "anchor", 0.371 with "mask" (oracle 0.630); bench/evaluate_volumes.py.
    tail_box: str = "anchor"
    # The box of a slice between two anchors: "hull" (the smallest box holding both anchors'
    # boxes) or "interpolated" (linear between them). Measured on six colin27 structures, one
    # box + 5 corrections: mean 3-D Dice 0.657 with "hull", 0.652 with "interpolated", and the
    # largest drop one correction caused 0.068 vs 0.166 (interpolated boxes under-cover rounded
    # structures between a tip and the widest slice).
    between_box: str = "hull"


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Embed:
    """The driver answers with the slice's embedding (whatever its decoder needs)."""

    slice_index: int


@dataclass(frozen=True)
class Decode:
    """The driver answers with a :class:`Decoded` for ``prompt`` on slice ``slice_index``
    (prompt coordinates: model-orientation pixels of that slice)."""

    slice_index: int
    embedding: object
    prompt: Prompt


@dataclass(frozen=True)
class Decoded:
    mask: np.ndarray        # bool (H, W), model orientation
    iou: float
    logits: np.ndarray      # float32 (h, w) low-res logits (the next slice's mask prompt)
    feature: np.ndarray | None = None   # the mask's mean embedding feature (see mask_feature)


def mask_feature(embedding: np.ndarray, logits: np.ndarray) -> np.ndarray | None:
    """The mean of the image embedding ``(1, C, e, e)`` over the cells where the low-res
    ``logits`` ``(h, w)`` (a multiple of ``e``) are mostly positive; unit length, or None."""
    c, e = embedding.shape[1], embedding.shape[-1]
    f = logits.shape[-1] // e
    if f < 1 or logits.shape[-2] // f != e:
        return None
    cells = (logits[: e * f, : e * f] > 0).reshape(e, f, e, f).mean(axis=(1, 3)) > 0.5
    if not cells.any():
        return None
    v = embedding[0][:, cells].mean(axis=1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None


@dataclass(frozen=True)
class SliceResult:
    """One slice of a segment. ``mask`` is bit-packed (``np.packbits`` of the (H, W) bool mask)
    so that a session's history stays small."""

    packed: np.ndarray
    shape: tuple[int, int]
    iou: float
    area: int
    box: Box

    @classmethod
    def of(cls, mask: np.ndarray, iou: float) -> "SliceResult":
        return cls(np.packbits(mask, axis=None), (int(mask.shape[0]), int(mask.shape[1])), float(iou),
                   int(np.count_nonzero(mask)), bounding_box(mask))

    @property
    def mask(self) -> np.ndarray:
        h, w = self.shape
        return np.unpackbits(self.packed, count=h * w).reshape(h, w).astype(bool)


# --------------------------------------------------------------------------- boxes
def bounding_box(mask: np.ndarray) -> Box:
    """The tight box (continuous pixel coordinates) of a non-empty bool mask, else (0,0,0,0)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return Box(0.0, 0.0, 0.0, 0.0)
    cols = np.flatnonzero(mask.any(axis=0))
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def grown(box: Box, rules: Rules, height: int, width: int, offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)) -> Box:
    """``box`` grown on each side by the larger of the margin and ``offset`` (x0, y0, x1, y1
    outwards, each at most ``max_offset_frac`` of the box side), clipped to the slice."""
    w, h = box.x1 - box.x0, box.y1 - box.y0
    mx, my = max(rules.min_margin_px, rules.margin * w), max(rules.min_margin_px, rules.margin * h)
    cap_x, cap_y = rules.max_offset_frac * w, rules.max_offset_frac * h
    d = (max(mx, min(offset[0], cap_x)), max(my, min(offset[1], cap_y)),
         max(mx, min(offset[2], cap_x)), max(my, min(offset[3], cap_y)))
    return Box(max(0.0, box.x0 - d[0]), max(0.0, box.y0 - d[1]), min(float(width), box.x1 + d[2]),
               min(float(height), box.y1 + d[3]))


def anchor_offset(prompt: Box, answer: Box, rules: Rules) -> tuple[float, float, float, float]:
    """How far the anchor's prompt box reaches out beyond its mask's box, per side (>= 0)."""
    if not rules.anchor_offset or answer.x1 <= answer.x0:
        return 0.0, 0.0, 0.0, 0.0
    return (max(0.0, answer.x0 - prompt.x0), max(0.0, answer.y0 - prompt.y0),
            max(0.0, prompt.x1 - answer.x1), max(0.0, prompt.y1 - answer.y1))


def interpolated(a: Box, b: Box, t: float) -> Box:
    return Box(*(float(u + (v - u) * t) for u, v in zip((a.x0, a.y0, a.x1, a.y1), (b.x0, b.y0, b.x1, b.y1))))


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Clicks:
    """The prompt of an anchor the user clicked on: ``box`` (None: the slice had neither an
    anchor box nor a mask when first clicked) and every click on the slice, in order.

    Its slice is decoded in rounds: the box alone (when there is one), then for each click
    ``i`` the box, clicks ``0..i`` and the previous round's low-res logits as ``mask_input``
    (with :attr:`Rules.mask_prompt`; a model without mask prompts runs with it off). So the
    last round's mask prompt is the slice's previous answer whenever the slice already was
    this anchor, and the whole anchor follows from ``(box, points)`` alone (hashable, the
    same on undo and redo). A slice first clicked where its mask came from propagation starts
    from its mask's box alone, not from the propagated logits (pieces keep no logits but
    their anchors')."""

    box: Box | None
    points: tuple[Point, ...]


Anchor = Box | Clicks   # what an anchor slice is prompted with


def anchor_box(anchor: Anchor) -> Box | None:
    """The box an anchor was given (None: a :class:`Clicks` anchor without one)."""
    return anchor if isinstance(anchor, Box) else anchor.box


@dataclass(frozen=True)
class Interaction:
    """One step of a segment's history, exactly one of: a box on a slice
    (``slice_index``, ``box``), clicks on a slice (``slice_index``, ``points``) or erased
    slices ``erase`` = (first, last)."""

    slice_index: int | None = None
    box: Box | None = None
    erase: tuple[int, int] | None = None
    points: tuple[Point, ...] = ()


@dataclass(frozen=True)
class State:
    """Everything a segment's masks follow from."""

    anchors: tuple[tuple[int, Anchor], ...] = ()    # sorted by slice
    erased: frozenset[int] = frozenset()
    bounds: tuple[int, int] = (0, 0)                 # the slice range propagation may cover

    def apply(self, step: Interaction, masks: Mapping[int, "SliceResult"] | None = None) -> "State":
        """The state after ``step``. A box replaces the slice's anchor (its clicks too); clicks
        are added to the slice's anchor, or make the slice one whose box is that of its
        current mask in ``masks`` (the segment's slices now; none there: no box). A box or
        clicks on an erased slice un-erase it; erasing removes the anchors of the range."""
        actions = (step.box is not None) + bool(step.points) + (step.erase is not None)
        if actions != 1:
            raise ValueError("an interaction is exactly one of: a box, clicks, or a slice range to erase")
        anchors = dict(self.anchors)
        erased = set(self.erased)
        if step.erase is not None:
            lo, hi = step.erase
            erased.update(range(lo, hi + 1))
            for k in range(lo, hi + 1):
                anchors.pop(k, None)
            return State(tuple(sorted(anchors.items())), frozenset(erased), self.bounds)
        if step.slice_index is None:
            raise ValueError("a box or clicks need their slice_index")
        k = int(step.slice_index)
        if step.box is not None:
            anchors[k] = step.box
        else:
            old = anchors.get(k)
            if isinstance(old, Clicks):
                anchors[k] = Clicks(old.box, old.points + tuple(step.points))
            elif isinstance(old, Box):
                anchors[k] = Clicks(old, tuple(step.points))
            else:
                current = None if masks is None or k in erased else masks.get(k)
                box = current.box if current is not None and current.area > 0 else None
                anchors[k] = Clicks(box, tuple(step.points))
        erased.discard(k)
        return State(tuple(sorted(anchors.items())), frozenset(erased), self.bounds)


@dataclass(frozen=True)
class Piece:
    """A run of slices computed together. ``kind``: "anchor" (one slice, its box or clicks),
    "between" (slices strictly between two anchors), "tail" (from an anchor outwards,
    ``step`` +1 or -1, up to ``limit`` inclusive)."""

    kind: str
    start: tuple[int, Anchor]
    end: tuple[int, Anchor] | None = None
    step: int = 0
    limit: int = 0

    @property
    def key(self) -> tuple:
        return (self.kind, self.start, self.end, self.step, self.limit)

    @property
    def needs(self) -> int | None:
        """The anchor slice whose result this piece starts from (None for an anchor)."""
        return None if self.kind == "anchor" else self.start[0]

    @property
    def needs_end(self) -> int | None:
        """The anchor slice a "between" piece ends at (its result gives the box of a
        :class:`Clicks` anchor without one); None for the other kinds."""
        return self.end[0] if self.kind == "between" and self.end is not None else None


def plan(state: State) -> list[Piece]:
    """The pieces of ``state``, anchors first (the others start from an anchor's result)."""
    lo, hi = state.bounds
    anchors = [(k, b) for k, b in state.anchors if lo <= k <= hi]
    pieces = [Piece("anchor", a) for a in anchors]
    erased = state.erased

    def free_until(k: int, step: int, stop: int) -> int:
        """The last slice from k+step towards ``stop`` (inclusive) before an erased one."""
        last = k
        for j in range(k + step, stop + step, step):
            if j in erased:
                break
            last = j
        return last

    for (k0, b0), (k1, b1) in zip(anchors, anchors[1:]):
        if k1 - k0 <= 1:
            continue
        if not any(j in erased for j in range(k0 + 1, k1)):
            pieces.append(Piece("between", (k0, b0), (k1, b1)))
            continue
        up, down = free_until(k0, 1, k1 - 1), free_until(k1, -1, k0 + 1)
        if up > k0:
            pieces.append(Piece("tail", (k0, b0), step=1, limit=up))
        if down < k1:
            pieces.append(Piece("tail", (k1, b1), step=-1, limit=down))
    if anchors:
        k, b = anchors[0]
        down = free_until(k, -1, lo)
        if down < k:
            pieces.append(Piece("tail", (k, b), step=-1, limit=down))
        k, b = anchors[-1]
        up = free_until(k, 1, hi)
        if up > k:
            pieces.append(Piece("tail", (k, b), step=1, limit=up))
    return pieces


# --------------------------------------------------------------------------- one piece
@dataclass
class PieceResult:
    slices: dict[int, SliceResult] = field(default_factory=dict)
    last_logits: np.ndarray | None = None       # anchors: the logits tails and betweens start from
    feature: np.ndarray | None = None           # anchors: their mask's embedding feature
    stop_reason: str = ""


Steps = Generator[object, object, PieceResult]


def neighbour_box(anchor: Anchor, result: PieceResult | None, k: int) -> Box | None:
    """The box the pieces beside anchor slice ``k`` are prompted with: the anchor's own box,
    else (clicks alone) its mask's bounding box in ``result``; None without either."""
    box = anchor_box(anchor)
    if box is not None:
        return box
    got = None if result is None else result.slices.get(k)
    return got.box if got is not None and got.area > 0 else None


def anchor_rounds(anchor: Anchor) -> list[Prompt]:
    """The prompts an anchor slice is decoded with, in order (see :class:`Clicks`); each
    round after the first gets the previous round's logits as ``mask_input`` (with
    :attr:`Rules.mask_prompt`)."""
    if isinstance(anchor, Box):
        return [Prompt(box=anchor)]
    rounds = [] if anchor.box is None else [Prompt(box=anchor.box)]
    return rounds + [Prompt(box=anchor.box, points=anchor.points[:i]) for i in range(1, len(anchor.points) + 1)]


def run_piece(piece: Piece, rules: Rules, shape: tuple[int, int], start: PieceResult | None = None,
              end: PieceResult | None = None) -> Steps:
    """Compute ``piece`` (``start``: the result of the anchor it starts from; ``end``: of the
    anchor a "between" piece ends at), yielding :class:`Embed` / :class:`Decode` requests and
    :class:`SliceDone` events."""
    height, width = shape
    out = PieceResult()
    if piece.kind == "anchor":
        k, anchor = piece.start
        emb = yield Embed(k)
        got = None
        for prompt in anchor_rounds(anchor):
            if got is not None and rules.mask_prompt:
                prompt = Prompt(box=prompt.box, points=prompt.points, mask_input=got.logits)
            got = yield Decode(k, emb, prompt)
        out.slices[k] = SliceResult.of(got.mask, got.iou)
        out.last_logits, out.feature = got.logits, got.feature
        yield SliceDone(k, out.slices[k])
        return out
    assert start is not None
    k0, _ = piece.start
    prev = start.slices.get(k0)
    logits = start.last_logits
    if piece.kind == "between":
        (k0, a0), (k1, a1) = piece.start, piece.end
        b0, b1 = neighbour_box(a0, start, k0), neighbour_box(a1, end, k1)
        if b0 is None or b1 is None:   # an anchor of clicks alone whose mask is empty: the other's box
            b0 = b1 = b0 if b0 is not None else b1
        if b0 is None:
            out.stop_reason = "between anchors"
            return out
        for j in range(k0 + 1, k1):
            if rules.between_box == "hull":
                box = Box(min(b0.x0, b1.x0), min(b0.y0, b1.y0), max(b0.x1, b1.x1), max(b0.y1, b1.y1))
            else:
                box = interpolated(b0, b1, (j - k0) / (k1 - k0))
            if box.x1 - box.x0 < 1 or box.y1 - box.y0 < 1:
                continue
            emb = yield Embed(j)
            mask_input = logits if rules.interpolated_mask_prompt else None
            got = yield Decode(j, emb, Prompt(box=box, mask_input=mask_input))
            logits = got.logits
            if np.count_nonzero(got.mask) >= rules.min_area_px:
                out.slices[j] = SliceResult.of(got.mask, got.iou)
                yield SliceDone(j, out.slices[j])
        out.stop_reason = "between anchors"
        return out
    # a tail: propagate from the anchor outwards
    j = k0
    own = neighbour_box(piece.start[1], start, k0)
    offset = anchor_offset(own, prev.box, rules) if prev is not None and own is not None else (0.0,) * 4
    reference = start.feature
    while True:
        if prev is None or prev.area < rules.min_area_px:
            out.stop_reason = "mask vanished"
            return out
        j += piece.step
        if (j - piece.limit) * piece.step > 0:
            out.stop_reason = "range end"
            return out
        box = grown(prev.box, rules, height, width, offset)
        if rules.tail_box == "anchor" and own is not None:
            box = own
        emb = yield Embed(j)
        got = yield Decode(j, emb, Prompt(box=box, mask_input=logits if rules.mask_prompt else None))
        area = int(np.count_nonzero(got.mask))
        reason = _stop(rules, prev, area, got.iou)
        if not reason and rules.min_similarity > 0 and reference is not None:
            sim = -1.0 if got.feature is None else float(got.feature @ reference)
            if sim < rules.min_similarity:
                reason = f"mask left the structure (feature similarity {sim:.2f} < {rules.min_similarity:g})"
        if reason:
            out.stop_reason = reason
            return out
        result = SliceResult.of(got.mask, got.iou)
        out.slices[j] = result
        yield SliceDone(j, result)
        prev, logits = result, got.logits


def _stop(rules: Rules, prev: SliceResult, area: int, iou: float) -> str:
    if area < rules.min_area_px:
        return "mask vanished"
    if iou < rules.min_iou:
        return f"predicted IoU {iou:.2f} below {rules.min_iou:g}"
    if area > prev.area * rules.max_area_ratio:
        return f"area grew more than {rules.max_area_ratio:g}x"
    if area * rules.max_area_ratio < prev.area:
        return f"area shrank more than {rules.max_area_ratio:g}x"
    return ""


@dataclass(frozen=True)
class SliceDone:
    """Event: slice ``slice_index`` of the piece being computed is done (stream it)."""

    slice_index: int
    result: SliceResult


# --------------------------------------------------------------------------- a whole state
def run_state(state: State, rules: Rules, shape: tuple[int, int],
              done: dict[tuple, PieceResult]) -> Generator[object, object, dict[tuple, PieceResult]]:
    """Compute every piece of ``state`` not yet in ``done`` (keyed by :attr:`Piece.key`);
    returns the results of ``state``'s pieces. Anchors first, then the pieces from them in
    order of their start slice."""
    results: dict[tuple, PieceResult] = {}
    pieces = plan(state)
    anchors = {p.start[0]: p for p in pieces if p.kind == "anchor"}
    for piece in pieces:
        if piece.key in done:
            results[piece.key] = done[piece.key]
            continue
        start = end = None
        if piece.needs is not None:
            start = results[anchors[piece.needs].key]
        if piece.needs_end is not None:
            end = results[anchors[piece.needs_end].key]
        results[piece.key] = yield from run_piece(piece, rules, shape, start, end)
    return results


def slices_of(results: Iterable[PieceResult]) -> dict[int, SliceResult]:
    out: dict[int, SliceResult] = {}
    for r in results:
        out.update(r.slices)
    return out


def stop_reasons(state: State, results: dict[tuple, PieceResult]) -> tuple[str, ...]:
    """Why each tail of ``state`` stopped, lowest slice first ("below: ...", "above: ...")."""
    out = []
    for piece in plan(state):
        if piece.kind == "tail":
            side = "below" if piece.step < 0 else "above"
            out.append(f"{side} slice {piece.start[0]}: {results[piece.key].stop_reason}")
    return tuple(out)


# --------------------------------------------------------------------------- a sync driver
def drive(steps: Generator, embed: Callable[[int], object], decode: Callable[[int, object, Prompt], Decoded],
          on_slice: Callable[[SliceDone], None] | None = None):
    """Run ``steps`` synchronously (evaluation, pseudo-labels); returns its value."""
    answer = None
    try:
        while True:
            request = steps.send(answer)
            answer = None
            if isinstance(request, Embed):
                answer = embed(request.slice_index)
            elif isinstance(request, Decode):
                answer = decode(request.slice_index, request.embedding, request.prompt)
            elif isinstance(request, SliceDone) and on_slice is not None:
                on_slice(request)
    except StopIteration as stop:
        return stop.value

