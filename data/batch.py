"""Examples -> token rows: chat format, prompt masking, truncation around the answer, packing, sampling.

Labels follow the Hugging Face convention: labels[i] = input_ids[i] where supervised, -100 elsewhere; the loss
shifts them (position t predicts labels[t + 1]). Only the answer and its end-of-turn token are supervised.

The prompt is tokenized as one string, encode(chat_prompt(render_prompt(ex))), and the answer as
encode(chat_answer(answer)): exactly the ids generation will see. Truncation therefore cuts the *context string*
and re-renders the prompt, never splices token lists. A contract or an answer that spells a special token
("<|eot_id|>", "<|im_end|>") is encoded as text: only the chat template's own special tokens are special ids
(model.tokenizer.ChatText), so no answer teaches a stop mid-clause and no contract closes the user's turn.
"""
import bisect
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from data.example import NONE, Example, render_prompt
from data.text import cut_context

IGNORE = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    id: str = ""
    truncated: bool = False   # the context was cut to fit seq_len
    target_cut: bool = False  # only the answer's first tokens are the target (no end of turn)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    target_cut: int = 0   # long clauses whose target is their first tokens only (no end of turn)
    skipped: list = field(default_factory=list)   # "id: why" for answers that cannot fit seq_len


def encode_example(tok, ex: Example, seq_len: int, min_target: int = 16) -> EncodedExample | None:
    """Token ids and labels for one example, at most seq_len long; None when the answer alone cannot fit.

    A context too long for the row is cut by data.text.cut_context (whole paragraphs dropped at random, never
    marking where the answer is). The context's budget keeps half the room the answer's copy in it leaves for other
    clauses (the other half is the target's); once the context is cut, the target takes all the room left. An
    answer too long for that keeps its whole text in the context and supervises only its first tokens (at
    least min_target, no end of turn): the choice of the clause happens at its start, and long clauses are
    exactly the ones a model must not learn to avoid.
    """
    answer_ids = whole_ids = tok.encode(tok.chat_answer(ex.answer))
    prompt_ids = tok.encode(tok.chat_prompt(render_prompt(ex)))
    truncated = False
    if len(prompt_ids) + len(answer_ids) > seq_len:
        truncated = True
        overhead = len(tok.encode(tok.chat_prompt(render_prompt(dataclasses.replace(ex, context="")))))
        in_context = 0 if ex.answer == NONE else len(tok.encode(ex.answer)) + 2
        if overhead + in_context + min(min_target, len(answer_ids)) > seq_len:
            return None   # the answer cannot even appear whole in the context beside a few target tokens
        # the room left once the context holds the answer is shared: the target takes at most half of it, so
        # the other half keeps other clauses in the context (with none, the example would teach "copy the start
        # of the context", not which clause to copy)
        free = seq_len - overhead - in_context
        answer_ids = answer_ids[:max(min(min_target, len(answer_ids)), (free + 1) // 2)]
        budget = seq_len - len(answer_ids)          # tokens left for the whole prompt
        chars_per_token = len(ex.context) / max(1, len(prompt_ids) - overhead)
        max_chars = int((budget - overhead) * chars_per_token)
        for _ in range(12):  # shrink until the re-rendered prompt fits; usually 1-2 rounds
            ctx = cut_context(ex.context, ex.answer, max_chars, ex.id)
            prompt_ids = tok.encode(tok.chat_prompt(render_prompt(dataclasses.replace(ex, context=ctx))))
            if len(prompt_ids) <= budget:
                break
            # below what was too long: a cut that moves by whole paragraphs may not change for a 2% step
            max_chars = min(int(max_chars * min(0.98, budget / len(prompt_ids))), len(ctx) - 1)
        else:
            return None
        assert ex.answer == NONE or ex.answer in ctx
        # the cut context may use less than its budget: the target gets the rest, so it is cut only when the
        # answer really does not fit (at its half, 118 of ACORD's 427 cut targets would have fitted, SmolLM2 at 1024)
        answer_ids = whole_ids[:seq_len - len(prompt_ids)]
    target_cut = len(answer_ids) < len(whole_ids)
    return EncodedExample(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, ex.id, truncated,
                          target_cut)


def encode_examples(tok, examples: list[Example], seq_len: int) -> tuple[list[EncodedExample], EncodeStats]:
    out, stats = [], EncodeStats()
    for ex in examples:
        stats.examples += 1
        enc = encode_example(tok, ex, seq_len)
        if enc is None:
            stats.skipped.append(f"{ex.id}: answer too long for seq_len {seq_len}")
            continue
        stats.truncated += enc.truncated
        stats.target_cut += enc.target_cut
        out.append(enc)
    return out, stats


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: groups of indices whose lengths sum to <= seq_len. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []   # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        assert n <= seq_len, f"sample {i} is {n} tokens, longer than seq_len {seq_len}"
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = seq_len, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def make_units(encoded: list[EncodedExample], seq_len: int, packed: bool) -> list[list[EncodedExample]]:
    """Rows to batch: several samples per row when packed, else one."""
    if not packed:
        return [[e] for e in encoded]
    return [[encoded[i] for i in row] for row in pack([len(e) for e in encoded], seq_len)]


WEIGHTINGS = ("token", "example")


def answer_weights(n: int, weighting: str, ends: bool = True) -> torch.Tensor:
    """Loss weight of each of an example's n supervised tokens (answer + end of turn).

    "token": 1 each; a step's loss is the mean over its tokens, so a 300-token clause outweighs a 2-token NONE
    150 to 1, and within a clause the two decisions that matter, where to start (which clause, or NONE) and
    where to stop, are 2 tokens of 300, drowned by the copy in between.
    "example": each example weighs 1 in total, spread as 1/(1+t) + 1/(n-t): heaviest at the first tokens (the
    choice) and at the last (the end of turn, the stop), light in the middle (copying, easy once started). A
    2-token NONE puts half on NONE and half on its end; a 300-token clause 8% on its first token, 16% on its
    first four, the same on its last four. ends=False (a target cut short, no end of turn): 1/(1+t) alone.
    Measured on ACORD (BENCHMARKS.md): with 1/(1+t) alone the model learned where clauses start but not where
    they end, and copied on into the next clause.
    """
    assert weighting in WEIGHTINGS, weighting
    if weighting == "token":
        return torch.ones(n)
    t = torch.arange(n, dtype=torch.float64)
    w = 1.0 / (1 + t) + (1.0 / (n - t) if ends else 0.0)
    return (w / w.sum()).float()


def collate(units: list[list[EncodedExample]], pad_id: int, pad_to: int | None = None,
            weighting: str = "token") -> dict[str, torch.Tensor]:
    """Rows of samples -> input_ids, labels, position_ids, segment_ids, each (B, T) long (+ loss_weights).

    Samples in a row get segment ids 0, 1, 2, ... and positions restarting at 0; padding (right) gets segment
    id -1, position 0, label -100, so no sample attends to another or to padding. With weighting "example" the
    batch also holds loss_weights (B, T) float32, aligned with labels (see answer_weights); "token" leaves it out
    (every supervised token weighs 1).
    """
    T = max(sum(len(e) for e in u) for u in units)
    T = max(T, pad_to or 0)
    B = len(units)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.full((B, T), -1, dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float32) if weighting != "token" else None
    for b, unit in enumerate(units):
        t = 0
        for s, e in enumerate(unit):
            n = len(e)
            input_ids[b, t:t + n] = torch.tensor(e.input_ids)
            labels[b, t:t + n] = torch.tensor(e.labels)
            position_ids[b, t:t + n] = torch.arange(n)
            segment_ids[b, t:t + n] = s
            if weights is not None:
                sup = [i for i, y in enumerate(e.labels) if y != IGNORE]
                weights[b, [t + i for i in sup]] = answer_weights(len(sup), weighting, ends=not e.target_cut)
            t += n
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids}
    if weights is not None:
        out["loss_weights"] = weights
    return out


class DistributedSampler:
    """Batches of unit indices for one rank: disjoint across ranks, deterministic, resumable mid-epoch.

    Each epoch: a permutation from (seed, epoch); with group_by_length, indices are sorted by length inside
    chunks of `group` batches so a batch holds similar lengths (less padding), and batch order is shuffled again
    with the longest batch first (an out-of-memory shows on step one, not hours in). Batch k of the epoch goes to
    rank k % world_size. If the batch count does not divide by world_size, drop_last drops the remainder, else
    the first batches are repeated so every rank runs the same number of steps.
    state_dict() = {"epoch", "offset"} (+ checks): offset counts this rank's batches already handed out.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = False, drop_last: bool = False, group: int = 64):
        assert 0 <= rank < world_size and batch_size > 0
        if len(lengths) < world_size * (1 if not drop_last else batch_size):
            raise ValueError(f"{len(lengths)} samples cannot feed {world_size} ranks at batch size {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.group_by_length, self.drop_last, self.group = shuffle, group_by_length, drop_last, group
        self.epoch, self.offset = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch in global order (before the split across ranks)."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            chunk = self.batch_size * self.group
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                    for c in np.array_split(order, max(1, -(-n // chunk)))])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.group_by_length:
            longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k]].sum())
            rest = [batches[k] for k in rng.permutation(len(batches)) if k != longest] if self.shuffle else \
                [b for k, b in enumerate(batches) if k != longest]
            batches = [batches[longest]] + rest
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        batches = self.epoch_batches(epoch)
        extra = len(batches) % self.world_size
        if extra:
            batches = batches[:-extra] if self.drop_last else batches + batches[:self.world_size - extra]
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.rank_batches(0))

    def __iter__(self):
        """Yield the rest of the current epoch from offset; the epoch advances when it is exhausted."""
        batches = self.rank_batches(self.epoch)
        while self.offset < len(batches):
            # counted before the caller gets the batch: a checkpoint taken after this step resumes after it
            self.offset += 1
            yield batches[self.offset - 1]
        self.epoch, self.offset = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n": len(self.lengths),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "n", "world_size", "batch_size"):
            if k in state and state[k] != mine[k]:
                raise ValueError(f"sampler state has {k}={state[k]}, this run has {mine[k]}; resume with the same "
                                 "data, seed, batch size and number of processes")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class Batches:
    """Examples -> packed rows -> this rank's micro-batches, endlessly (epoch after epoch), resumable.

    Rows are built identically on every rank (deterministic packing of all examples); the sampler then hands
    global batch k to rank k % world_size, so the rows of a step do not depend on the number of processes.
    Plain values in, plain tensors out: the training loop owns the devices and the config.
    """

    def __init__(self, tok, examples, *, seq_len: int, pack: bool, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, weighting: str = "token",
                 pad_to_seq_len: bool = False):
        encoded, stats = encode_examples(tok, examples, seq_len)
        if not encoded:
            raise ValueError(f"no example fits --seq-len {seq_len} (first: {stats.skipped[0]})")
        self.stats = stats
        self.units = make_units(encoded, seq_len, pack)
        self.pad_id, self.weighting = tok.pad_id, weighting
        self.pad_to = seq_len if pad_to_seq_len else None  # every batch (B, seq_len): one shape at every step
        self.sampler = DistributedSampler([sum(len(e) for e in u) for u in self.units], batch_size, rank=rank,
                                          world_size=world_size, seed=seed, shuffle=shuffle,
                                          group_by_length=not pack)
        self._it = iter(self.sampler)

    @property
    def num_rows(self) -> int:
        return len(self.units)

    def _collate(self, idx: list[int]) -> dict:
        b = collate([self.units[i] for i in idx], self.pad_id, pad_to=self.pad_to, weighting=self.weighting)
        b["num_tokens"] = int((b["segment_ids"] >= 0).sum())  # real tokens, padding excluded
        return b

    def next_batch(self) -> dict:
        while True:
            try:
                return self._collate(next(self._it))
            except StopIteration:  # epoch done; the sampler has moved to the next one
                self._it = iter(self.sampler)

    def first(self, n: int) -> list[dict]:
        """This rank's share of the epoch's first n batches in fixed order (evaluation; n = 0: all of them): the
        n batches are dealt out across ranks, none repeated, so the evaluated rows do not depend on the number of
        processes (a rank may get one fewer; the callers sum over ranks)."""
        batches = self.sampler.epoch_batches(0)
        batches = batches[:n] if n else batches
        return [self._collate(idx) for idx in batches[self.sampler.rank::self.sampler.world_size]]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)
        self._it = iter(self.sampler)
