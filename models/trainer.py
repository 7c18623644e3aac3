"""The online learner: micro-batch gradient steps on the two-tower model.

State split (matches the Flink state layout, see docs/design.md "State rules"):
- ``dense blob``: dense tower parameters + their optimizer state (+ EMA), one versioned blob;
- ``rows``: id-embedding rows (embedding + optimizer slots), only touched rows are returned;
- ``catalog``: every known item (text embedding, categories, counts), touched entries only;
- ``meta``: counters (step, version, events seen, ...) as a small dict.

:class:`OnlineLearner` is a *cache* of that state. ``ensure_loaded`` rebuilds it when the
state's step counter differs from the cache's (after a restore, or on another worker).
Randomness (row init, negative sampling) is seeded from ``(seed, step)`` in state, never
from the wall clock, so the same input gives the same model.

Its parts live beside it: the towers in ``models/two_tower.py``, the co-occurrence memory
in ``models/cooccurrence.py``, the losses in ``models/losses.py``, the id rows' optimizers
in ``models/row_optimizer.py``; this module holds the cache, the step and the ranking.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.adaptive import assign_new_classes, resort_by_frequency
from models.catalog import Catalog, category_bucket
from models.config import HISTORY_SOURCES, ModelConfig, TrainerConfig
from models.cooccurrence import CoOccurrenceMemory
from models.device import pick_device, set_cpu_threads
from models.events import Item
from models.gate import PublicationGate
from models.history import Sample
from models.item_table import ItemTable, stable_seed
from models.losses import bpr_loss, full_softmax_loss, head_loss, sampled_softmax_loss
from models.row_optimizer import ADAGRAD_INIT, optimizer_slots, row_step
from models.state_format import check_format
from models.text_encoder import EncodesText, text_hash
from models.two_tower import TwoTower, blend_scores, history_transition_scores

log = logging.getLogger(__name__)
# The formats of the dense blob and of meta this release writes and reads
# (models/state_format.py).
DENSE_FORMAT = 1
META_FORMAT = 1
LOSSES = ("sampled_softmax", "full_softmax", "bpr", "adaptive_softmax")


def _tensors_to(obj: Any, convert: Callable[[Any], Any]) -> Any:
    """``obj`` with every tensor (or numpy array) in its dicts / lists / tuples converted."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        return convert(obj)
    if isinstance(obj, dict):
        return {k: _tensors_to(v, convert) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_tensors_to(v, convert) for v in obj)
    return obj


def preload() -> None:
    """Import what the first learner pulls in lazily: ``torch.optim`` imports
    ``torch._dynamo`` (hundreds of modules, seconds of CPU) on its first optimizer. The job's
    trainer calls this from a background thread when it opens, so that the import overlaps
    the wait for its first batch instead of delaying the first step after a (re)start."""
    import torch._dynamo  # noqa: F401


def new_meta(model_key: str) -> dict[str, Any]:
    return {
        "format": META_FORMAT,
        "model_key": model_key,
        "step": 0,
        "version": 0,
        "events_seen": 0,
        "positives_trained": 0,
        "last_export_step": 0,
        "hwm_ts": 0,
        "non_finite_skips": 0,
        "oov": 0,
        "expired_rows": 0,
        "items_ingested": 0,
        "targets_without_text": 0,
        "loss_ema": None,
        "recall10_ema": None,
    }


def check_meta(meta: dict[str, Any]) -> None:
    """Raise :class:`~models.state_format.StateFormatError` unless a meta restored from
    state has this release's format."""
    check_format(
        "trainer meta state", meta.get("format"), META_FORMAT, str(meta.get("model_key", ""))
    )


@dataclass
class StepResult:
    """What one call to :meth:`OnlineLearner.learn` changed (to be written to state)."""

    touched_rows: dict[str, bytes] = field(default_factory=dict)
    removed_rows: list[str] = field(default_factory=list)
    touched_items: dict[str, bytes] = field(default_factory=dict)
    removed_items: list[str] = field(default_factory=list)
    dense_blob: bytes | None = None
    loss: float | None = None
    skipped_non_finite: bool = False
    # The publication gate's stored graphs when they changed (models/gate.py).
    gate_blob: bytes | None = None


@dataclass
class RankedBatch:
    """The scores a batch's positives were ranked with, for the blend loss of the step that
    learns from them (:meth:`OnlineLearner.rank_batch`, then ``learn(..., ranked)``).

    The blend learns from exactly the scores the test half of test-then-train measured,
    and the step does not score the catalogue a second time. Positives whose target was not
    in the catalogue at ranking time (a miss) have no blend loss.

    n: number of positives ranked; at [K]: positions of the K ranked ones among them;
    targets [K] catalogue indices; blended [K, size] scores before masking (differentiable
    in the blend and transition weights); masked [K, size] the same scores, detached, with
    what the ranking leaves out (history, padding, holes) at -inf: the scores ranked;
    hist [K, H] the ranked positives' histories (catalogue indices, newest first), which
    ``learn`` reuses when every positive was ranked and the catalogue has not grown since.
    """

    n: int
    at: torch.Tensor
    targets: torch.Tensor
    blended: torch.Tensor
    masked: torch.Tensor
    hist: torch.Tensor | None = None


class OnlineLearner:
    """Cache of one model key's trainer state with the gradient step on top."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainerConfig,
        device: torch.device | None = None,
        text_dim: int = 0,
    ):
        if cfg.loss not in LOSSES:
            raise ValueError(f"trainer.loss must be one of {', '.join(LOSSES)}; got {cfg.loss!r}")
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.device = device or pick_device()
        # Process-wide: the thread count changes float reduction order, so the job, its
        # offline replay and `rtrec eval` must all use the same one to agree bit for bit.
        if cfg.torch_threads > 0:
            set_cpu_threads(cfg.torch_threads)
        if model_cfg.history_source not in HISTORY_SOURCES:
            raise ValueError(
                f"model.history_source must be one of {', '.join(HISTORY_SOURCES)}; "
                f"got {model_cfg.history_source!r}"
            )
        self.dim = model_cfg.dim
        self.text_dim = text_dim
        # Id rows: [embedding D | optimizer slots | transition memory: M indices, M counts,
        # and with forgetting on, the row's count epoch (models/cooccurrence.py)].
        self.trans_m = model_cfg.transition_slots if cfg.loss != "adaptive_softmax" else 0
        self.trans_off = model_cfg.dim + optimizer_slots(cfg.optimizer, model_cfg.dim)
        self.memory = CoOccurrenceMemory(model_cfg, self.trans_m, self.trans_off)
        self.trans_width = self.memory.width
        self.slots = optimizer_slots(cfg.optimizer, model_cfg.dim) + self.trans_width
        # meta["positives_trained"] as of the cache: the clock the transition counts fade by.
        self.positives = 0
        self.loaded_step: int | None = None
        # Set by `rtrec pretrain --unfreeze-top N`: catalogue indices [N] -> differentiable
        # text embeddings [N, T] from the language model being fine-tuned.
        self.text_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Learning-rate multiplier of the next step (models/metrics.py sets it while a
        # drift boost is on; it is derived from meta state, never stored here).
        self.lr_scale = 1.0
        # Which exported versions are published, with the serving ones loaded
        # (models/gate.py; its state is in meta and the trainer's gate blob).
        self.gate = PublicationGate(cfg)
        self._fresh()

    # ----------------------------------------------------------------- state <-> cache
    def _fresh(self) -> None:
        # Seed the dense init from config without disturbing the process-wide RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "dense"))
            self.model = TwoTower(self.model_cfg, self.text_dim).to(self.device)
            self.asm: nn.AdaptiveLogSoftmaxWithLoss | None = None
            if self.cfg.loss == "adaptive_softmax":
                n = self.model_cfg.max_items + 1
                cutoffs = [c for c in self.cfg.adaptive_cutoffs if 0 < c < n - 1]
                self.asm = nn.AdaptiveLogSoftmaxWithLoss(
                    self.dim, n, cutoffs=cutoffs or [max(1, n // 2)], div_value=2.0
                ).to(self.device)
        params = self._dense_params()
        if self.cfg.optimizer == "adagrad":
            self.opt: torch.optim.Optimizer = torch.optim.Adagrad(
                params, lr=self.cfg.lr, initial_accumulator_value=ADAGRAD_INIT
            )
        elif self.cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        else:
            self.opt = torch.optim.SGD(params, lr=self.cfg.lr)
        self.ema: dict[str, torch.Tensor] | None = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.cfg.ema_decay > 0
            else None
        )
        self.table = ItemTable(
            self.dim,
            self.slots,
            self.model_cfg.max_items,
            self.model_cfg.init_std,
            self.cfg.seed,
            self.device,
            slot_init=ADAGRAD_INIT if self.cfg.optimizer == "adagrad" else 0.0,
        )
        self.catalog = Catalog(self.text_dim, self.device)

    def _dense_params(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.asm is not None:
            params += list(self.asm.parameters())
        return params

    def dense_blob(self) -> bytes:
        """The dense parameters + optimizer state (+ EMA) as one blob, written every step:
        a pickle of numpy arrays, which is cheaper to write than a ``torch.save`` zip."""
        obj = {
            "format": DENSE_FORMAT,
            "optimizer": self.cfg.optimizer,
            "loss": self.cfg.loss,
            "text_dim": self.text_dim,
            "model": self.model.state_dict(),
            "asm": None if self.asm is None else self.asm.state_dict(),
            "ema": self.ema,
            "opt": self.opt.state_dict(),
        }
        return pickle.dumps(_tensors_to(obj, lambda t: t.detach().cpu().numpy()), protocol=5)

    def ensure_loaded(
        self,
        meta: dict[str, Any],
        dense_blob: Callable[[], bytes | None],
        rows: Callable[[], Iterable[tuple[str, bytes]]],
        items: Callable[[], Iterable[tuple[str, bytes]]] = lambda: (),
    ) -> None:
        """Rebuild the cache from state unless it already reflects ``meta['step']``."""
        self.positives = meta["positives_trained"]
        if self.loaded_step == meta["step"]:
            return
        self._fresh()
        blob = dense_blob()
        if blob is not None:
            self.load_dense(blob)
        self.table.load_rows(rows())
        self.catalog.load(items())
        for item_id, r in self.table.index.items():
            idx = self.catalog.index.get(item_id)
            if idx is not None:
                self.catalog.row_of[idx] = r
        self.loaded_step = meta["step"]

    def load_dense(self, blob: bytes) -> None:
        obj = pickle.loads(blob)
        check_format("dense trainer state", obj.get("format"), DENSE_FORMAT)
        obj = _tensors_to(obj, lambda a: torch.from_numpy(a.copy()).to(self.device))
        for key, mine in (
            ("optimizer", self.cfg.optimizer),
            ("loss", self.cfg.loss),
            ("text_dim", self.text_dim),
        ):
            if obj.get(key) != mine:
                raise ValueError(
                    f"state was trained with {key}={obj.get(key)!r} but this job has {mine!r}; "
                    "use the original trainer/model settings or start a new model key"
                )
        self.model.load_state_dict(obj["model"])
        if self.asm is not None and obj.get("asm") is not None:
            self.asm.load_state_dict(obj["asm"])
        if self.ema is not None and obj.get("ema") is not None:
            self.ema = {k: v.to(self.device) for k, v in obj["ema"].items()}
        self.opt.load_state_dict(obj["opt"])

    # ---------------------------------------------------------------------- catalogue
    def ingest_items(
        self, items: list[Item], meta: dict[str, Any], encoder: EncodesText | None
    ) -> dict[str, bytes]:
        """Add/refresh catalogue items; text is embedded only when new or changed.

        An item's ``text_vector`` (embedded upstream, udfs/embed.py) is used as is; the
        others are embedded here with ``encoder`` (offline runs: the job's rows arrive
        embedded).
        Returns the packed catalogue entries to write to state.
        """
        cat = self.catalog
        latest: dict[str, Item] = {}
        for it in items:  # the last record per id wins
            latest[it.item_id] = it
        to_embed: list[tuple[int, str, bytes]] = []
        for item_id, it in sorted(latest.items()):
            idx = cat.ensure(item_id)
            r = self.table.index.get(item_id)
            cat.row_of[idx] = r if r is not None else 0
            text = it.full_text
            thash = text_hash(text)
            buckets = (
                [category_bucket(c, self.model_cfg.category_buckets) for c in it.categories]
                if self.model_cfg.category_buckets > 0
                else []
            )
            vec = None
            if self.text_dim > 0 and text and it.text_vector:
                vec = np.frombuffer(it.text_vector, dtype=np.float32)
                if vec.shape != (self.text_dim,):
                    raise ValueError(
                        f"catalogue item {item_id!r}: its text vector has {vec.size} values, "
                        f"the model's text encoder {self.text_dim}; the embedding stage and "
                        "the trainer must use the same model.text_encoder"
                    )
                vec = vec.copy()  # (a writable array for torch)
            elif encoder is not None and text and cat.text_hash.get(idx) != thash:
                to_embed.append((idx, text, thash))
            cat.set_content(idx, vec, thash, buckets)
            cat.last_seen[idx] = max(int(cat.last_seen[idx]), it.ts)
        if to_embed and encoder is not None:
            embs = encoder.encode([text for _, text, _ in to_embed])
            for (idx, _, thash), emb in zip(to_embed, embs, strict=True):
                buckets = [int(b) for b in cat.cats[idx] if b > 0]
                cat.set_content(idx, emb, thash, buckets)
        meta["items_ingested"] += len(latest)
        ids = list(latest)
        return dict(zip(ids, cat.pack_many([cat.index[i] for i in ids]), strict=True))

    # ----------------------------------------------------------------------- vectors
    def item_vectors(
        self,
        cat_idx: torch.Tensor,
        id_rows: torch.Tensor | None = None,
        ema: bool = False,
        trainable_text: bool = False,
    ) -> torch.Tensor:
        """Item vectors [*, D] for catalogue indices (0 = padding -> zeros).

        ``trainable_text`` takes text embeddings from ``text_fn`` (LM fine-tuning) instead
        of the frozen ones in the catalogue.
        """
        cat = self.catalog
        flat = cat_idx.reshape(-1)
        rows_idx = torch.from_numpy(cat.row_of[flat.cpu().numpy()]).to(self.device)
        ids = (
            self.table.data[rows_idx, : self.dim]
            if id_rows is None
            else id_rows.reshape(-1, self.dim)
        )
        text = cat.text[flat] if self.text_dim > 0 else None
        if trainable_text and self.text_fn is not None and self.text_dim > 0:
            text = self.text_fn(flat)
        cats = torch.from_numpy(cat.cats[flat.cpu().numpy()]).to(self.device)
        tower = self.model.item_tower
        if ema and self.ema is not None:
            tower = self._ema_model().item_tower
        out: torch.Tensor = tower(ids, text, cats)
        out = out * (flat > 0).to(out.dtype).unsqueeze(1)
        return out.reshape(*cat_idx.shape, self.dim)

    def catalogue_vectors(self) -> torch.Tensor:
        """Item vectors [size, D] of every catalogue index (no grad): :meth:`item_vectors`
        of them all, on slices of the catalogue's arrays instead of gathers (its text
        vectors alone are [size, T], copied every step by a gather)."""
        cat, n = self.catalog, self.catalog.size
        with torch.no_grad():
            rows = torch.from_numpy(cat.row_of[:n]).to(self.device)
            text = cat.text[:n] if self.text_dim > 0 else None
            cats = torch.from_numpy(cat.cats[:n]).to(self.device)
            out: torch.Tensor = self.model.item_tower(self.table.data[rows, : self.dim], text, cats)
            out[:1].mul_(0.0)  # the padding index (item_vectors' mask, the same zeros)
            return out

    def _ema_model(self) -> TwoTower:
        m = TwoTower(self.model_cfg, self.text_dim).to(self.device)
        m.load_state_dict(self.ema if self.ema is not None else self.model.state_dict())
        return m.eval()

    def export_model(self) -> TwoTower:
        """The dense towers to export: EMA weights when ``trainer.ema_decay`` > 0."""
        return self._ema_model() if self.ema is not None else self.model

    # ----------------------------------------------------------------------- learning
    def seen(self, s: Sample) -> tuple[str, ...]:
        """The items of ``s`` the model reads, oldest -> newest (``model.history_source``)."""
        return s.events if self.model_cfg.history_source == "events" else s.history

    def _history_batch(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """history catalogue indices [B, H] newest first, 0-padded, and mask [B, H]."""
        h = self.model_cfg.history_length
        get = self.catalog.index.get
        seqs = [self.seen(s) for s in samples]
        # Padded Python rows, one array conversion (element-wise numpy stores cost more).
        ids = np.array(
            [[get(item, 0) for item in q[: -h - 1 : -1]] + [0] * (h - len(q)) for q in seqs],
            dtype=np.int64,
        ).reshape(len(samples), h)
        t = torch.from_numpy(ids).to(self.device)
        return t, (t > 0)

    def _known_batch(self, samples: list[Sample]) -> torch.Tensor:
        """Catalogue indices [B, E] of the items of each sample's last ``user.known_items``
        events of any label (``Sample.events``, a superset of the [B, H] the towers read),
        0-padded: what ranking leaves out, whatever ``model.history_source`` is (an item
        the user rated low is known to them all the same). E: the batch's longest."""
        get = self.catalog.index.get
        seqs = [s.events for s in samples]
        e = max((len(q) for q in seqs), default=0)
        ids = np.array(
            [[get(item, 0) for item in q] + [0] * (e - len(q)) for q in seqs],
            dtype=np.int64,
        ).reshape(len(samples), e)
        return torch.from_numpy(ids).to(self.device)

    def _admit(self, idx: int, touched_rows: set[int], meta: dict[str, Any]) -> None:
        cat, table = self.catalog, self.table
        if cat.row_of[idx] == 0 and cat.count[idx] >= self.model_cfg.admission_threshold:
            r = table.lookup(cat.ids[idx], add=True)
            cat.row_of[idx] = r
            if r == 0:
                meta["oov"] += 1  # id table full: the item is represented by text/categories
        if cat.row_of[idx] > 0:
            touched_rows.add(int(cat.row_of[idx]))

    def _expire(self, meta: dict[str, Any], result: StepResult) -> None:
        """Drop id rows (and text-less catalogue entries) unseen for ``expiry_ms`` event time."""
        ttl = self.model_cfg.expiry_ms
        if ttl <= 0:
            return
        horizon = meta["hwm_ts"] - ttl
        table, cat = self.table, self.catalog
        n = len(table.ids)
        stale = np.nonzero((table.last_seen[1:n] < horizon) & (table.last_seen[1:n] > 0))[0] + 1
        for r in stale.tolist():
            item_id = table.ids[r]
            if not item_id:
                continue
            table.remove(item_id)
            result.removed_rows.append(item_id)
            idx = cat.index.get(item_id)
            if idx is not None:
                cat.row_of[idx] = 0
        meta["expired_rows"] += len(stale)
        m = cat.size
        gone = (
            np.nonzero(
                (cat.last_seen[1:m] < horizon) & ~cat.has_text[1:m] & (cat.row_of[1:m] == 0)
            )[0]
            + 1
        )
        for idx in gone.tolist():
            item_id = cat.ids[idx]
            if item_id:
                cat.remove(item_id)
                result.removed_items.append(item_id)
                result.touched_items.pop(item_id, None)

    def learn(
        self, samples: list[Sample], meta: dict[str, Any], ranked: RankedBatch | None = None
    ) -> StepResult:
        """One gradient step on a micro-batch; updates ``meta`` in place.

        ``result.loss`` is the batch's loss before the step (the prequential loss). The
        ranking half of test-then-train is :func:`models.metrics.prequential_step`, which
        scores the batch with :meth:`rank_batch` and passes ``ranked`` on: the blend then
        learns from the scores the batch was ranked with (:class:`RankedBatch`).
        """
        meta["events_seen"] += len(samples)
        if samples:
            meta["hwm_ts"] = max(meta["hwm_ts"], max(s.ts for s in samples))
        pos = [s for s in samples if s.label == 1 and s.weight > 0]
        result = StepResult()
        if not pos:
            return result
        if ranked is not None and ranked.n != len(pos):
            raise ValueError(
                f"learn() was given the ranking of {ranked.n} positives for a batch of "
                f"{len(pos)}; rank_batch() must be called on the same batch's positives"
            )
        cat, table, d = self.catalog, self.table, self.dim
        h = self.model_cfg.history_length
        new_entries: set[str] = set()
        for s in pos:
            for item in (*self.seen(s)[-h:], s.target):
                if item not in cat.index:
                    new_entries.add(item)
                    cat.ensure(item)
        target_idx = np.array([cat.index[s.target] for s in pos], dtype=np.int64)
        if self.asm is not None:
            assign_new_classes(cat, target_idx, self.asm.n_classes)
        touched_rows: set[int] = set()
        for s, t in zip(pos, target_idx.tolist(), strict=True):
            cat.count[t] += 1
            cat.last_seen[t] = max(int(cat.last_seen[t]), s.ts)
            if not cat.has_text[t]:
                meta["targets_without_text"] += 1
            self._admit(t, touched_rows, meta)
            r = int(cat.row_of[t])
            if r:
                table.last_seen[r] = max(int(table.last_seen[r]), s.ts)
        if (
            ranked is not None
            and ranked.hist is not None
            and not new_entries
            and len(ranked.at) == len(pos)
        ):
            # Every positive was ranked, in order, against this very catalogue.
            hist = ranked.hist
            mask = hist > 0
        else:
            hist, mask = self._history_batch(pos)
        targets = torch.from_numpy(target_idx).to(self.device)
        weights = torch.tensor([s.weight for s in pos], device=self.device)

        step = meta["step"]
        gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, "neg", step))
        negs = torch.randint(1, cat.size, (self.cfg.num_negatives,), generator=gen).numpy()
        live = cat.live[negs]
        negs_t = torch.from_numpy(negs[live]).to(self.device)
        hard = self._transition_negatives(hist)
        cand = torch.unique(torch.cat([targets, negs_t, hard]))  # sorted catalogue indices
        labels = torch.searchsorted(cand, targets)

        # Leaf tensor over the touched id rows only; position 0 of `sub_full` is a zero row.
        hist_rows = torch.from_numpy(cat.row_of[hist.cpu().numpy()]).to(self.device)
        cand_rows = torch.from_numpy(cat.row_of[cand.cpu().numpy()]).to(self.device)
        rows = torch.unique(torch.cat([hist_rows.reshape(-1), cand_rows]))
        rows = rows[rows > 0]
        sub = table.data[rows, :d].clone().requires_grad_(True)
        sub_full = torch.cat([torch.zeros(1, d, device=self.device), sub])

        def pos_of(r: torch.Tensor) -> torch.Tensor:
            return torch.where(r > 0, torch.searchsorted(rows, r) + 1, torch.zeros_like(r))

        self.model.train()
        # The item tower runs once per distinct history item (a batch's histories overlap
        # a lot), then its vectors are gathered back into [B, H, D].
        hist_u, hist_at = torch.unique(hist, return_inverse=True)  # [U], [B, H]
        hist_u_rows = torch.from_numpy(cat.row_of[hist_u.cpu().numpy()]).to(self.device)
        hist_ids = sub_full[pos_of(hist_u_rows)]  # [U, D]
        cand_ids = sub_full[pos_of(cand_rows)]
        p = self.model_cfg.id_dropout
        if p > 0:
            g = torch.Generator().manual_seed(stable_seed(self.cfg.seed, "id-dropout", step))
            keep_c = (torch.rand(cand_ids.shape[0], 1, generator=g) >= p).to(self.device)
            cand_ids = cand_ids * keep_c
        hist_vecs = self.item_vectors(hist_u, hist_ids, trainable_text=True)[hist_at]  # [B,H,D]
        user = self.model.user_vectors(hist_vecs, mask.float())  # [B, D]
        # The towers learn from their own loss (trainer.loss) alone; the blend of their dot
        # products with the transition evidence is learned against the catalogue's best
        # items (the evidence is sparse: sampled negatives rarely have any).
        blend_vec: torch.Tensor | None = None

        def towers_loss(extra: torch.Tensor | None = None) -> torch.Tensor:
            """extra [B, size]: scores added to the dot products (None: none)."""
            if self.cfg.loss == "full_softmax":
                return self._full_softmax_loss(user, rows, sub, pos, targets, step, extra)
            cand_vecs = self.item_vectors(cand, cand_ids, trainable_text=True)  # [C, D]
            cand_extra = extra[:, cand] if extra is not None else None
            return self._loss(user, cand_vecs, cand, labels, targets, cand_extra)

        if self.blending and ranked is not None:
            loss_vec = towers_loss()
            if len(ranked.at):
                ranked_vec = self._head_loss(ranked.blended, ranked.masked, ranked.targets)
                blend_vec = ranked_vec.new_zeros(len(pos)).index_add(0, ranked.at, ranked_vec)
        else:
            trans = self.transition_scores(hist, mask)  # [B, size] (memory before the batch)
            if self.blending and trans is not None:
                loss_vec = towers_loss()
                known = self._known_batch(pos)
                blend_vec = self._blend_loss(user.detach(), known, trans, targets)
            else:
                loss_vec = towers_loss(trans)
        loss = (loss_vec * weights).sum() / weights.sum()
        # The reported (prequential, drift-watched) loss is the towers' loss alone: the
        # blend's head-restricted loss is 0 for samples outside the head and too jumpy.
        reported = loss.detach()
        if blend_vec is not None:
            loss = loss + (blend_vec * weights).sum() / weights.sum()
        if self.cfg.l2 > 0:
            loss = loss + self.cfg.l2 * (sub.pow(2).sum() / len(pos))

        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in self._dense_params() if p.grad is not None]
        all_grads = [*grads, sub.grad] if sub.grad is not None else grads
        # One norm over every gradient is finite exactly when every gradient is (one check
        # instead of one per tensor); clipping uses the same norm. Clipping non-finite
        # gradients spoils them, but such a step is skipped and its gradients cleared.
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_([*self._dense_params(), sub], self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(all_grads)
        finite = math.isfinite(loss.item()) and math.isfinite(float(norm))
        if not finite:
            meta["non_finite_skips"] += 1
            log.warning(
                "model %s step %d: non-finite loss or gradient, step skipped (%d so far)",
                meta["model_key"],
                step,
                meta["non_finite_skips"],
            )
            result.skipped_non_finite = True
            self.opt.zero_grad(set_to_none=True)
        else:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * self.lr_scale
            self.opt.step()
            if sub.grad is not None:
                self._sparse_update(rows, sub.grad)
            self._update_ema()
            meta["positives_trained"] += len(pos)
            self.positives = meta["positives_trained"]
            lv = float(reported.item())
            meta["loss_ema"] = (
                lv if meta["loss_ema"] is None else 0.98 * meta["loss_ema"] + 0.02 * lv
            )
            result.loss = lv
            result.dense_blob = self.dense_blob()
            touched_rows.update(rows.tolist())
            self._remember_transitions(hist, target_idx, touched_rows)
        meta["step"] += 1
        if self.asm is not None and meta["step"] % max(1, self.cfg.adaptive_resort_steps) == 0:
            moved = resort_by_frequency(self.asm, self.opt, cat)
            if moved:  # classes are part of every catalogue entry: write them all
                new_entries.update(cat.index)
                if result.dense_blob is not None:
                    result.dense_blob = self.dense_blob()
        self._expire(meta, result)
        self.loaded_step = meta["step"]
        live_rows = [r for r in sorted(touched_rows) if table.ids[r]]
        result.touched_rows = dict(
            zip([table.ids[r] for r in live_rows], table.pack_rows(live_rows), strict=True)
        )
        items = [
            i for i in {*(cat.ids[int(t)] for t in target_idx), *new_entries} if i in cat.index
        ]
        packed = cat.pack_many([cat.index[i] for i in items])
        result.touched_items.update(zip(items, packed, strict=True))
        return result

    def _loss(
        self,
        user: torch.Tensor,
        cand_vecs: torch.Tensor,
        cand: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss [B] for the configured objective (``extra`` [B, C]: scores added
        to the dot products, the transition memory's)."""
        if self.cfg.loss == "adaptive_softmax":
            assert self.asm is not None
            classes = torch.from_numpy(self.catalog.asm_class[targets.cpu().numpy()])
            classes = classes.to(self.device)
            lp = self.asm.log_prob(user).gather(1, classes.clamp(min=0).unsqueeze(1)).squeeze(1)
            return -lp * (classes >= 0).to(lp.dtype)  # -1: past the class capacity, not learned
        scores = user @ cand_vecs.t()  # [B, C]
        if extra is not None:
            scores = scores + extra
        if self.cfg.loss == "bpr":
            return bpr_loss(scores, labels)
        cat = self.catalog
        counts = torch.from_numpy(cat.count[cand.cpu().numpy()]).to(self.device, torch.float32)
        total = float(cat.count[: cat.size].sum())
        log_q = torch.log((counts + 1.0) / (total + len(cat)))
        return sampled_softmax_loss(scores, labels, log_q, self.cfg.temperature, self.cfg.logq)

    def _full_softmax_loss(
        self,
        user: torch.Tensor,
        rows: torch.Tensor,
        sub: torch.Tensor,
        pos: list[Sample],
        targets: torch.Tensor,
        step: int,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample cross-entropy [B] of each target against the whole catalogue, as it is
        ranked: the user's known items (but the target), padding and holes are left out.

        user [B, D]; rows [R] the step's id rows, sub [R, D] their differentiable
        embeddings; targets [B] catalogue indices; extra [B, size]: scores added to the
        dot products (the transition memory's, when it is not blended).

        Every item's content part (text projection, categories) learns from every
        sample; id embeddings learn in the step's rows only (histories, targets, sampled
        negatives), the other items' enter the softmax as constants: a step then writes
        as many id rows to state as with the sampled softmax. Item text is the frozen
        catalogue's (fine-tuning the language model reaches it through the histories).
        """
        cat, n, d = self.catalog, self.catalog.size, self.dim
        row_of = torch.from_numpy(cat.row_of[:n]).to(self.device)  # [size]
        ids = self.table.data[row_of, :d]  # [size, D]
        if len(rows):
            at = torch.searchsorted(rows, row_of).clamp(max=len(rows) - 1)
            learns = (row_of > 0) & (rows[at] == row_of)
            ids = torch.where(learns.unsqueeze(1), sub[at], ids)
        p = self.model_cfg.id_dropout
        if p > 0:  # (the catalogue's ids, hidden as a sampled candidate's would be)
            g = torch.Generator().manual_seed(stable_seed(self.cfg.seed, "id-dropout", step))
            ids = ids * (torch.rand(n, 1, generator=g) >= p).to(self.device)
        text = cat.text[:n] if self.text_dim > 0 else None
        cats = torch.from_numpy(cat.cats[:n]).to(self.device)
        vecs = self.model.item_tower(ids, text, cats)  # [size, D]
        scores = user @ vecs.t()  # [B, size]
        if extra is not None:
            scores = scores + extra
        out = self._excluded(self._known_batch(pos))
        return full_softmax_loss(scores, targets, out, self.cfg.temperature)

    def _blend_loss(
        self,
        user: torch.Tensor,
        known: torch.Tensor,
        trans: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample softmax loss [B] of the blended score over the whole catalogue, as it
        is ranked (dead items and the known history excluded; the target always competes).

        user [B, D] (detached: only the blend and transition weights learn here), known
        [B, E] (:meth:`_known_batch`), trans [B, size] transition scores, targets [B].
        """
        with torch.no_grad():
            all_vecs = self.catalogue_vectors()
        dot = user @ all_vecs.t()  # [B, size]
        excluded = self._excluded(known)
        blended = blend_scores(self.model, dot, trans, self._cold(), excluded)
        return self._head_loss(blended, blended.detach().masked_fill(excluded, -math.inf), targets)

    def _head_loss(
        self, blended: torch.Tensor, masked: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample softmax loss [B] of blended scores [B, size] over each sample's
        ``trainer.blend_head`` best items + its target. ``masked`` [B, size]: ``blended``
        detached with what is out of play (history, padding, holes) at -inf, as ranked
        (:class:`RankedBatch`); the target always competes, even if out of play."""
        return head_loss(blended, masked, targets, self.cfg.blend_head, self.cfg.temperature)

    @property
    def blending(self) -> bool:
        """Whether scores blend dot products and the transition memory (learned scale)."""
        return self.trans_m > 0 and self.model.blend_weight is not None

    def _excluded(self, known: torch.Tensor) -> torch.Tensor:
        """[B, size] bool: what a ranking leaves out for known histories [B, E]
        (:meth:`_known_batch`): the user's known items, padding and holes."""
        size = self.catalog.size
        excluded = torch.zeros(known.shape[0], size, dtype=torch.bool, device=self.device)
        excluded.scatter_(1, known, True)
        excluded[:, 0] = True
        return excluded | self._dead().unsqueeze(0)

    def _cold(self) -> torch.Tensor:
        """[size] float: 1 for catalogue items never learned as a positive (no evidence)."""
        cat = self.catalog
        return torch.from_numpy(cat.count[: cat.size] == 0).to(self.device, torch.float32)

    def _dead(self) -> torch.Tensor:
        """[size] bool: padding and holes of the catalogue (no item)."""
        cat = self.catalog
        return torch.from_numpy(~cat.live[: cat.size]).to(self.device)

    def score_all(self, user: torch.Tensor, vecs: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, size] of every catalogue index (padding and holes = -inf); ``vecs``
        [size, D]: the catalogue's item vectors when already computed."""
        cat = self.catalog
        if self.asm is not None:
            cls = torch.from_numpy(cat.asm_class[: cat.size]).to(self.device)
            scores = self.asm.log_prob(user)[:, cls.clamp(min=0)]
            scores = scores.masked_fill((cls < 0).unsqueeze(0), -math.inf)
        else:
            scores = user @ (vecs if vecs is not None else self.catalogue_vectors()).t()
        return scores.masked_fill(self._dead().unsqueeze(0), -math.inf)

    def score_histories(self, samples: list[Sample]) -> torch.Tensor:
        """Eval-mode scores [B, size] of every catalogue index for each sample's history;
        padding, holes and the user's known items (the whole of :meth:`seen`, not only
        the towers' last H) are -inf, as the exported graph does given them as
        ``exclude_ids``."""
        return self._score(samples, keep_blend=False)[0]

    def _score(
        self, samples: list[Sample], keep_blend: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`score_histories`, and with ``keep_blend`` (and the blend on) also the
        blended scores before masking [B, size], differentiable in the blend and
        transition weights (see :class:`RankedBatch`); last, the histories [B, H] scored."""
        self.model.eval()
        with torch.no_grad():
            hist, mask = self._history_batch(samples)
            known = self._known_batch(samples)
            # One whole-catalogue pass gives the history's vectors and the dot products
            # (the adaptive softmax scores classes, not item vectors).
            vecs = self.catalogue_vectors() if self.asm is None else None
            hist_vecs = vecs[hist] if vecs is not None else self.item_vectors(hist)
            user = self.model.user_vectors(hist_vecs, mask.float())
        kept = None
        if self.blending and vecs is not None:
            with torch.set_grad_enabled(keep_blend):
                trans = self.transition_scores(hist, mask)
                dot = user @ vecs.t()
                excluded = self._excluded(known)
                blended = blend_scores(self.model, dot, trans, self._cold(), excluded)
            if keep_blend:
                kept = blended
            scores = blended.detach().masked_fill(self._dead().unsqueeze(0), -math.inf)
        else:
            with torch.no_grad():
                trans = self.transition_scores(hist, mask)
                scores = self.score_all(user, vecs)
                if trans is not None:
                    scores = scores + trans
        scores.scatter_(1, known, -math.inf)
        scores[:, 0] = -math.inf
        return scores, kept, hist

    def rank_targets(self, samples: list[Sample]) -> list[int]:
        """Test step of test-then-train: the 1-based rank of each sample's target among all
        catalogue items, excluding the user's history (eval mode, current weights).

        A target the model does not know yet gets rank ``len(catalog) + 1`` (a miss).
        Call it *before* ``learn`` on the same samples.
        """
        return self.rank_batch(samples, for_learning=False)[0]

    def rank_batch(
        self, samples: list[Sample], for_learning: bool = True
    ) -> tuple[list[int], RankedBatch | None]:
        """:meth:`rank_targets`, and with ``for_learning`` what :meth:`learn` reuses when
        it is given the same positives next (None when nothing is reusable)."""
        if not samples:
            return [], None
        cat = self.catalog
        miss = len(cat) + 1
        known_at = [i for i, s in enumerate(samples) if s.target in cat.index]
        known = [samples[i] for i in known_at]
        ranks: dict[int, int] = {}
        ranked = None
        if for_learning and self.blending and self.asm is None:
            # No positive known at ranking time: none has a blend loss (as for a miss).
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            ranked = RankedBatch(len(samples), none, none, none.float(), none.float())
        if known:
            scores, kept, hist = self._score(known, keep_blend=for_learning)
            with torch.no_grad():
                tgt = torch.tensor([cat.index[s.target] for s in known], device=self.device)
                tscore = scores.gather(1, tgt.unsqueeze(1))
                r = (scores > tscore).sum(dim=1) + 1
                r = torch.where(torch.isfinite(tscore.squeeze(1)), r, torch.full_like(r, miss))
            for s, v in zip(known, r.tolist(), strict=True):
                ranks[id(s)] = int(v)
            if kept is not None:
                at = torch.tensor(known_at, device=self.device)
                ranked = RankedBatch(len(samples), at, tgt, kept, scores, hist)
        return [ranks.get(id(s), miss) for s in samples], ranked

    # ------------------------------------------------------------ transition memory
    def successors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transition memory per catalogue index: successor indices [size, M] (0 = empty
        slot) and their counts [size, M]; items without an id row have none."""
        cat = self.catalog
        rows = torch.from_numpy(cat.row_of[: cat.size]).to(self.device)
        idx, cnt = self._memory(rows)
        return idx.long(), cnt

    def transition_scores(
        self, hist: torch.Tensor, mask: torch.Tensor, model: TwoTower | None = None
    ) -> torch.Tensor | None:
        """Transition-memory scores [B, size] of every catalogue index for histories
        [B, H] (None when the memory is off)."""
        weight = (model or self.model).transition_weight
        if weight is None or self.trans_m == 0:
            return None
        cat = self.catalog
        newest = hist[:, : weight.shape[0]]  # [B, P]: only their memories are read
        rows = torch.from_numpy(cat.row_of[newest.cpu().numpy()]).to(self.device)
        idx, cnt = self._memory(rows)  # [B, P, M] each
        return history_transition_scores(weight, idx.long(), cnt, mask, cat.size)

    def _memory(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour catalogue indices [*S, M] (float32) and counts [*S, M] (faded) of the
        id rows ``rows`` (any shape S)."""
        return self.memory.read(self.table.data, rows, self.positives)

    def _transition_negatives(self, hist: torch.Tensor) -> torch.Tensor:
        """The most frequent remembered successors of each sample's newest history item
        (``trainer.transition_negatives`` per sample): catalogue indices, live items only."""
        k = min(self.cfg.transition_negatives, self.trans_m)
        if k == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        cat = self.catalog
        rows = torch.from_numpy(cat.row_of[hist[:, 0].cpu().numpy()]).to(self.device)
        idx = self.memory.strongest(self.table.data, rows, k)
        live = torch.from_numpy(cat.live[idx.cpu().numpy()]).to(self.device)
        return idx[live]

    def _remember_transitions(
        self, hist: torch.Tensor, targets: npt.NDArray[np.int64], touched_rows: set[int]
    ) -> None:
        """Count the pairs of each positive's newest history items (hist [B, H], newest
        first, 0 = padding) and its target (targets [B]): :meth:`CoOccurrenceMemory.remember`."""
        if self.trans_m:
            rows = self.memory.remember(
                self.table.data, self.catalog.row_of, hist, targets, self.positives
            )
            touched_rows.update(rows.tolist())

    def _sparse_update(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply the configured optimizer to the touched id rows only ([R, D] grads)."""
        row_step(
            self.table.data, rows, grad, self.cfg.optimizer, self.cfg.lr * self.lr_scale, self.dim
        )

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.ema_decay
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)

    def export_due(self, meta: dict[str, Any], now: float | None = None) -> bool:
        """Publish every ``export_every_steps`` steps, or after ``export_every_seconds``
        of processing time with unpublished progress (not in deterministic mode)."""
        if meta["step"] == meta["last_export_step"]:
            return False
        if meta["step"] - meta["last_export_step"] >= self.cfg.export_every_steps:
            return True
        if self.cfg.deterministic:
            return False
        last = float(meta.get("last_export_wall", 0.0))
        elapsed = (now if now is not None else time.time()) - last
        return elapsed >= self.cfg.export_every_seconds
