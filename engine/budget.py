"""What fits in a memory budget, from the ledger alone: the longest sequence and the largest batch whose predicted
bytes on the card stay within it (`python -m engine.memory --budget 15GiB`), and, with offload, whose block inputs
parked in host RAM by every process on the machine stay within a host budget too (`--host-budget`, `--nproc`).
Pure arithmetic over engine.ledger.predict; a GPU run of `engine.memory --measure` at the answer confirms it."""
from __future__ import annotations

import dataclasses

from engine.ledger import Ledger, Setup, predict

SEQ_STEP = 256  # fit() answers sequence lengths in multiples of this: finer would promise more than the estimate holds
MAX_FIT_BATCH = 1 << 16  # an upper end for the batch search; any real budget runs out long before


def on_card(led: Ledger) -> int:
    """What the card must hold, the figure a budget is compared with: the predicted peak allocated plus what lies
    outside the allocator's count (CUDA context, allocator slack; no such rows off CUDA)."""
    return led.peak + led.total("outside")


def on_host(led: Ledger) -> int:
    """What one process keeps in host RAM for the step: the offloaded block inputs (--offload on a GPU; 0
    otherwise). Not the process itself, its libraries, the model's loading or the data: the ledger does not
    predict those."""
    return led.total("saved", where="host")


def fit_grid(cfg, what: str, step: int | None = None) -> tuple[int, int]:
    """(step, top) of fit()'s search for `what`: sequences in multiples of SEQ_STEP up to the model's
    max_position_embeddings, batches in ones up to MAX_FIT_BATCH."""
    if what not in ("seq_len", "batch_size"):
        raise ValueError(f"fit: what must be seq_len or batch_size, not {what!r}")
    if what == "seq_len":
        return step or SEQ_STEP, cfg.max_position_embeddings
    return step or 1, MAX_FIT_BATCH


def fits(led: Ledger, budget: int, host_budget: int | None = None, nproc: int = 1) -> bool:
    """Whether the card holds on_card(led) within `budget` and, when a host budget is given, the host holds
    `nproc` processes' on_host(led) within it."""
    return on_card(led) <= budget and (host_budget is None or nproc * on_host(led) <= host_budget)


def fit(cfg, s: Setup, budget: int, what: str = "seq_len", step: int | None = None, *,
        host_budget: int | None = None, nproc: int = 1) -> int | None:
    """The largest `what` (seq_len or batch_size), the other knobs as in `s`, whose on_card() bytes are at most
    `budget` (and, with `host_budget`, whose host bytes for `nproc` processes are at most that): a multiple of
    `step` (SEQ_STEP for sequences, 1 for batches), sequences never above the model's max_position_embeddings.
    None when even one step does not fit. Searches (doubling, then bisecting) on the ledger's monotone growth in
    both knobs, on the card and on the host; tests check that monotony on a grid."""
    step, top = fit_grid(cfg, what, step)
    top //= step  # the search runs in steps: k fits when k * step does

    def fits_at(k: int) -> bool:
        return fits(predict(cfg, dataclasses.replace(s, **{what: k * step})), budget, host_budget, nproc)

    if top < 1 or not fits_at(1):
        return None
    lo, hi = 1, 2  # in steps; invariant: lo fits, hi does not or lies above top
    while hi <= top and fits_at(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, top + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo * step
