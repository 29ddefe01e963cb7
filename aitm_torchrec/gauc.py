"""GAUC (group AUC): per user, the AUC of that user's rows; then the mean over users.

EasyRec's metric, asked for per tower: ``metrics_set: [{gauc: {uid_field: user_id, reduction:
mean_by_sample_num}}]``.

Definition:

- A user is one raw value of the ``uid_field`` column: an integer as it is, a string byte for byte
  (never a hashed bucket). Rows whose uid is null or an empty string belong to no user and are
  left out (as a missing id gives an empty bag).
- A user's AUC is the share of that user's (positive, negative) row pairs that the model orders
  correctly; a tie (equal scores) counts one half, as in the AUC. Rows are ranked by their float32
  probability, the value the exact AUC ranks by and ``launch/score.py`` writes, so scoring's
  ``--metrics`` and training's eval give the same GAUC from the same probabilities.
- A user whose rows are all one class has no AUC and is skipped.
- GAUC = sum_u w_u AUC_u / sum_u w_u over the users kept, with ``reduction``:
  ``mean_by_sample_num`` (w_u = the user's rows; our YAML default), ``mean`` (w_u = 1; EasyRec's
  default) or ``mean_by_positive_num`` (w_u = the user's positive rows). No user kept: 0.0
  (EasyRec's value, and the AUC's for one class). ``gauc_users`` reports how many users counted.

Across ranks, exact. A user's rows may be on any rank. ``update`` keeps this rank's rows (the uid,
then per tower a float32 probability and a float32 label: 8 bytes a tower and 8 bytes an integer
uid, or the string's bytes). ``compute`` sends each row to rank ``splitmix64(uid) mod W`` with
``all_to_all_single`` (once per uid column, for all the towers that share it; a string uid
travels as its bytes), so every user's rows meet on one rank; that rank computes its users' AUCs,
and one ``all_reduce`` sums the weighted AUCs, the weights and the user counts. A rank holds its
own rows, and during ``compute`` the rows sent to it: about rows / W each when users spread over
the ranks (one user's rows always go to one rank). 1 and W ranks compute every user's AUC from
the same rows and scores; only the order of the final float64 sum differs (about 1e-16).

Per rank, vectorised (no Python loop over users): two stable sorts order the rows by (user,
score); a run is the rows of one user with one score. Per run its positives and negatives; the
user's negatives ranked below the run are an exclusive cumulative sum within the user; a run's
pairs won are positives x (negatives below + half the run's own negatives); sums per user give
the user's AUC. Counts are float64 integers, exact up to 2^53 rows.

Why not ``torchrec.metrics``' GAUC (``torchrec/metrics/gauc.py`` in 1.8.0): a group there is a run
of ``num_candidates`` consecutive rows within one update (a session laid out by the caller), so a
user whose rows arrive in two batches or on two ranks counts as two groups; its ranks break ties
by the sort instead of counting them half; it skips groups whose predictions are all equal, and
reads a prediction of 0 as padding; and it averages groups unweighted only (EasyRec's ``mean``,
not ``mean_by_sample_num``). EasyRec's own (``easy_rec/python/core/metrics.py``) keeps Python
lists per user and, distributed, merges every worker's rows in one process through JSON files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from aitm_torchrec.features import DataError, is_string, mix64, string_hash64

REDUCTIONS = ("mean_by_sample_num", "mean", "mean_by_positive_num")

_INTS, _STRINGS, _NONE = 0, 1, -1  # the kind of a uid column, as the ranks exchange it


@dataclass(frozen=True)
class GaucSpec:
    """One tower's GAUC. ``task``: the tower's index (its column in the logits and labels)."""

    tower: str
    task: int
    uid_field: str
    reduction: str = "mean_by_sample_num"


def gauc_specs(towers: Sequence) -> tuple[GaucSpec, ...]:
    """The gauc entries of the towers' ``metrics_set`` (config ``TaskTower``s, in tower order;
    validation allows at most one a tower)."""
    return tuple(GaucSpec(t.tower_name, i, m.gauc.uid_field, m.gauc.reduction)
                 for i, t in enumerate(towers) for m in t.metrics_set if m.gauc is not None)


def uid_columns(specs: Sequence[GaucSpec]) -> dict[str, str]:
    """The uid columns to read, each with what needs it (for a missing column's message)."""
    towers: dict[str, list[str]] = {}
    for s in specs:
        towers.setdefault(s.uid_field, []).append(s.tower)
    return {col: f"gauc of {', '.join(names)}" for col, names in towers.items()}


def user_aucs(users: torch.Tensor, scores: torch.Tensor,
              positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per user: (AUC, rows, positive rows), float64, users in ascending key order.

    users: R int64 keys; scores: R (compared as they are); positive: R bool. A user with one
    class only gets AUC 0.0 (``reduce_users`` skips it)."""
    f64 = {"dtype": torch.float64, "device": users.device}
    if users.numel() == 0:
        empty = torch.zeros(0, **f64)
        return empty, empty, empty
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(users[order], stable=True)]  # by user, then by score
    u, s, pos = users[order], scores[order], positive[order].to(torch.float64)
    user_starts = torch.ones_like(u, dtype=torch.bool)
    user_starts[1:] = u[1:] != u[:-1]
    run_starts = user_starts.clone()  # a run: one user's rows with one score (a tie)
    run_starts[1:] |= s[1:] != s[:-1]
    run = torch.cumsum(run_starts, 0) - 1
    num_runs = int(run[-1]) + 1
    run_rows = torch.zeros(num_runs, **f64).index_add_(0, run, torch.ones_like(pos))
    run_pos = torch.zeros(num_runs, **f64).index_add_(0, run, pos)
    run_neg = run_rows - run_pos
    user_of_run = (torch.cumsum(user_starts, 0) - 1)[run_starts]
    num_users = int(user_of_run[-1]) + 1
    # negatives in the user's earlier (lower-scored) runs: an exclusive cumsum less the user's start
    below = torch.cumsum(run_neg, 0) - run_neg
    first_run = torch.nonzero(user_starts[run_starts]).squeeze(1)
    below = below - below[first_run][user_of_run]
    wins = run_pos * (below + 0.5 * run_neg)

    def per_user(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_users, **f64).index_add_(0, user_of_run, x)

    won, rows, positives = per_user(wins), per_user(run_rows), per_user(run_pos)
    pairs = positives * (rows - positives)
    return torch.where(pairs > 0, won / pairs.clamp_min(1.0), torch.zeros_like(won)), rows, positives


def reduce_users(auc: torch.Tensor, rows: torch.Tensor, positives: torch.Tensor, reduction: str) -> torch.Tensor:
    """3 float64: (sum of w_u x AUC_u, sum of w_u, users kept) over the users with both classes."""
    kept = (positives > 0) & (positives < rows)
    weight = {"mean": torch.ones_like(rows), "mean_by_sample_num": rows, "mean_by_positive_num": positives}[reduction]
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    return torch.stack([(weight * auc).sum(), weight.sum(), kept.sum().to(torch.float64)])


def gauc_value(sums: torch.Tensor) -> float:
    """GAUC from ``reduce_users``' sums (added over ranks): 0.0 when no user was kept."""
    return float(sums[0] / sums[1]) if float(sums[1]) > 0 else 0.0


def gauc(users: torch.Tensor, scores: torch.Tensor, positive: torch.Tensor, reduction: str = "mean_by_sample_num") -> float:
    """GAUC of rows held in one process (users: R int64, scores: R, positive: R bool)."""
    return gauc_value(reduce_users(*user_aucs(users, scores, positive), reduction))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def uid_values(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[pa.Array | np.ndarray, np.ndarray]:
    """A uid column of N rows -> (the uids of the rows kept: int64 numpy, or an Arrow
    large_string array; kept: N bool). Null and empty-string uids are not kept."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid()
    if is_string(arr.type):
        valid = pc.and_(valid, pc.not_equal(pc.binary_length(arr), 0)).fill_null(False)
        return arr.filter(valid).cast(pa.large_string()), valid.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(arr.type):
        ints = arr.filter(valid).to_numpy(zero_copy_only=False).astype(np.int64)  # uint64: the same bits
        return ints, valid.to_numpy(zero_copy_only=False)
    raise DataError(f"gauc: uid column {name!r} has type {arr.type}; user ids must be integers or strings")


def _kind(values: pa.Array | np.ndarray) -> int:
    return _STRINGS if isinstance(values, pa.Array) else _INTS


def _exchange(t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """Rows ``t`` (grouped by destination rank, ``send[r]`` rows for rank r) -> the rows every
    rank sent here (``recv[r]`` from rank r), in rank order. Collective."""
    out = torch.empty((sum(recv), *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_to_all_single(out, t.contiguous(), recv, send)
    return out


def _string_keys(arr: pa.Array) -> np.ndarray:
    """Equal strings -> equal int64 keys (the index of the string among the distinct ones)."""
    return arr.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_string array without nulls -> (offsets N + 1 from 0, bytes)."""
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, len(arr) + 1, arr.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, np.uint8, end - start, start) if end > start else np.zeros(0, np.uint8)
    return offsets - start, data


def _route(uids: list, values: list[torch.Tensor], width: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's kept rows (uid chunks, N x ``width`` value chunks) -> the rows of the users
    that belong to this rank, from every rank: (R int64 user keys, R x width values). Every row
    of one user lands on the same rank. Collective when the world is larger than one."""
    kinds = {_kind(u) for u in uids}
    if len(kinds) > 1:
        raise DataError("gauc: the uid column holds integers in some files and strings in others")
    kind = kinds.pop() if kinds else _NONE
    vals = torch.cat(values) if values else torch.zeros(0, width, device=device)
    strings = pa.concat_arrays(uids) if kind == _STRINGS else None
    ints = np.concatenate(uids) if kind == _INTS else None
    world = _world()
    if world == 1:
        keys = _string_keys(strings) if strings is not None else ints if ints is not None else np.zeros(0, np.int64)
        return torch.from_numpy(keys).to(device), vals
    if strings is not None:
        h = string_hash64(strings)
    elif ints is not None:
        h = ints.view(np.uint64)
    else:
        h = np.zeros(0, np.uint64)
    dest = (mix64(h) % np.uint64(world)).astype(np.int64)
    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=world)
    meta = torch.tensor(np.stack([send_counts, np.full(world, kind)], axis=1), dtype=torch.int64, device=device)
    got = _exchange(meta, [1] * world, [1] * world).cpu()  # from each rank: rows for us, its kind
    kinds = set(got[:, 1].tolist()) - {_NONE}
    if len(kinds) > 1:
        raise DataError("gauc: the uid column holds integers on some ranks' files and strings on others'")
    kind = kinds.pop() if kinds else _NONE
    send, recv = send_counts.tolist(), got[:, 0].tolist()
    vals = _exchange(vals[torch.from_numpy(order).to(device)], send, recv)
    if kind == _INTS:
        ints = ints if ints is not None else np.zeros(0, np.int64)
        keys = _exchange(torch.from_numpy(ints[order]).to(device), send, recv)
        return keys, vals
    if kind == _NONE:
        return torch.zeros(0, dtype=torch.int64, device=device), vals
    # strings: their lengths travel like the rows, their bytes by the byte counts per rank
    strings = strings if strings is not None else pa.array([], pa.large_string())
    offsets, data = _string_buffers(strings.take(pa.array(order)))
    bounds = np.concatenate([[0], np.cumsum(send_counts)])
    send_bytes = (offsets[bounds[1:]] - offsets[bounds[:-1]]).tolist()
    lengths = _exchange(torch.from_numpy(np.diff(offsets)).to(device), send, recv).cpu().numpy()
    got_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rbounds = np.concatenate([[0], np.cumsum(recv)])
    recv_bytes = (got_offsets[rbounds[1:]] - got_offsets[rbounds[:-1]]).tolist()
    got_data = _exchange(torch.from_numpy(data.copy()).to(device), send_bytes, recv_bytes).cpu().numpy()
    arr = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(got_offsets), pa.py_buffer(got_data))
    return torch.from_numpy(_string_keys(arr)).to(device), vals


class GroupAUC:
    """GAUC of the towers in ``specs`` (module docstring): ``update`` with every batch's real rows,
    ``compute`` once on every rank (a collective when the world is larger than one)."""

    def __init__(self, specs: Sequence[GaucSpec], device: torch.device | str = "cpu") -> None:
        for s in specs:
            if s.reduction not in REDUCTIONS:
                raise ValueError(f"gauc reduction must be one of {REDUCTIONS}, not {s.reduction!r}")
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self.columns = list(dict.fromkeys(s.uid_field for s in self.specs))
        self._specs = {c: [s for s in self.specs if s.uid_field == c] for c in self.columns}
        self._uids: dict[str, list] = {c: [] for c in self.columns}
        self._values: dict[str, list[torch.Tensor]] = {c: [] for c in self.columns}

    def update(self, uids: pa.Table, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """N real rows: ``uids`` holds the uid columns, ``probs`` and ``labels`` are N x T (every
        tower; float32 probabilities, 0/1 labels)."""
        for c in self.columns:
            values, kept = uid_values(uids.column(c), c)
            tasks = [s.task for s in self._specs[c]]
            v = torch.cat([probs[:, tasks].float(), labels[:, tasks].float()], dim=1)
            if not kept.all():
                v = v[torch.from_numpy(kept).to(v.device)]
            self._uids[c].append(values)
            self._values[c].append(v.to(self.device))

    def compute(self) -> dict[str, dict[str, float]]:
        """{tower: {"gauc": value, "gauc_users": users counted}}, the same on every rank."""
        order, sums = [], []
        for c in self.columns:
            specs = self._specs[c]
            k = len(specs)
            users, values = _route(self._uids[c], self._values[c], 2 * k, self.device)
            for j, s in enumerate(specs):
                auc, rows, positives = user_aucs(users, values[:, j], values[:, k + j] > 0.5)
                sums.append(reduce_users(auc, rows, positives, s.reduction))
                order.append(s)
        if not sums:
            return {}
        state = torch.stack(sums)
        if _world() > 1:
            dist.all_reduce(state)  # weighted AUC sums, weights and user counts of every rank
        state = state.cpu()
        return {s.tower: {"gauc": gauc_value(state[i]), "gauc_users": int(state[i, 2])} for i, s in enumerate(order)}
