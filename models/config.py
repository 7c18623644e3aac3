"""Typed, frozen configuration for the model, the trainer and the per-user stage.

These dataclasses are pure Python so that ``models`` stays free of Flink; the job's
full configuration (``flink_job.config``) composes them with Kafka and job settings.

Every key keeps its one-line meaning in its field's metadata (``"doc"``, see :func:`meta`
and :func:`setting`) for the generated reference, docs/configuration.md. Keys marked
``perf=True`` only tune performance (speed, latency, resource use), never what is
computed; each dataclass lists them last, under a "Performance only" comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def meta(doc: str, *, perf: bool = False) -> dict[str, object]:
    """Field metadata of a config key: its one-line meaning ``doc`` and ``perf`` = whether
    it only tunes performance. A table takes it as ``field(default_factory=...,
    metadata=meta(...))``."""
    return {"doc": doc, "perf": perf}


def setting(default: T, doc: str, *, perf: bool = False) -> T:
    """A config key with an immutable ``default`` and its :func:`meta`."""
    return field(default=default, metadata=meta(doc, perf=perf))


# Values of model.history_source (see ModelConfig).
HISTORY_SOURCES = ("events", "positives")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the two-tower model: embeddings, user tower, text and category features,
    the item-to-item transition memory and the id lifecycle."""

    dim: int = setting(
        32, "Embedding width D of item and user vectors (the text embedding is projected to D)."
    )
    history_length: int = setting(20, "H: how many of a user's most recent items the tower reads.")
    hidden: int = setting(64, "Width of the user-tower MLP.")
    max_items: int = setting(
        100_000, "Capacity of the dynamic id vocabulary (id rows, not counting the pad row)."
    )
    init_std: float = setting(0.05, "Standard deviation of the normal init of new id rows.")
    text_encoder: str = setting(
        "minilm",
        'Item-text encoder: "minilm" (bundled all-MiniLM-L6-v2), "none" (id-only items) '
        "or a local Hugging Face model directory.",
    )
    text_max_length: int = setting(64, "Tokens of an item's text the encoder reads.")
    text_precision: str = setting(
        "auto",
        'Arithmetic of the text encoder: "auto" (bfloat16 where the CPU or GPU computes it '
        'natively, else float32; float32 in deterministic mode), "float32" or "bfloat16".',
    )
    category_buckets: int = setting(64, "Buckets of the hashed category embeddings (0 = off).")
    dropout: float = setting(0.0, "Dropout rate in the user-tower MLP while training.")
    user_tower: str = setting(
        "attention",
        'User tower: "attention" (static-query attention pooling + newest item + MLP) or '
        '"sequence" (one self-attention block over the recent items, read at the newest one, '
        "plus a learned item-to-item transition map from the newest items).",
    )
    # A low rating still says what the user chose to consume next: as context it
    # predicts the next positive better than the positives alone, and ranking should not
    # offer an item the user already rated, however low.
    history_source: str = setting(
        "events",
        'What the towers and the transition memory read and ranking leaves out: "events" '
        '(the user\'s items of every label, Sample.context) or "positives" (Sample.history).',
    )
    transition_items: int = setting(
        3, 'Newest history items that feed the transition map of the "sequence" tower.'
    )
    # The memory adds sum_p w_p * log(1 + count(h_p -> j)) to the score of item j, over the
    # transition_window newest history items h_p, with w learned by the loss.
    # Popular items co-occur with thousands of others; too few slots keep evicting real
    # neighbours (rtrec eval shows it against cooccurrence_windowed). Each slot costs 8
    # bytes per id row in state.
    transition_slots: int = setting(
        256,
        "Item-to-item transition memory learned online: strongest neighbours each id row "
        "keeps (catalogue index + count); 0 = off.",
    )
    transition_window: int = setting(
        10, "Newest history items whose transition counts add to a candidate's score."
    )
    transition_pairs: int = setting(
        10,
        'Newest history items h_d (d = 0 newest) whose "h_d -> target" transition each '
        "positive counts, weighted transition_decay ** d (the newest history_length at most).",
    )
    transition_decay: float = setting(
        0.8, "Weight ratio of successive counted pairs (1 = all pairs count the same)."
    )
    # Tastes and catalogues drift: old co-occurrences should weigh less than new ones. The
    # clock is learned positives, not event time, so a quiet hour forgets nothing and a
    # replay forgets as much as the live run did.
    transition_half_life: int = setting(
        5000,
        "Learned positives after which a transition count weighs half as much (exponential "
        "forgetting); 0 = counts never fade.",
    )
    # Co-occurrence within a short span is evidence in both directions.
    transition_symmetric: bool = setting(
        True, 'Each positive also counts "target -> h_d" for the same pairs.'
    )
    # DropoutNet-style cold start: the text/category part must rank items on its own,
    # which is all a brand-new item has.
    id_dropout: float = setting(
        0.25, "Probability of hiding an item's id embedding in a training sample."
    )
    admission_threshold: int = setting(
        1, "Interactions before an item gets its own id row (below it: text and category only)."
    )
    expiry_ms: int = setting(
        0, "Event time without interactions after which an item's id row is dropped (0 = never)."
    )


@dataclass(frozen=True)
class TrainerConfig:
    """How the online trainer learns, when it publishes model versions, and its
    prequential metrics and drift detection."""

    optimizer: str = setting(
        "adagrad", '"adagrad" (row-wise for the sparse id rows), "sgd" or "adam" (dense part).'
    )
    loss: str = setting(
        "sampled_softmax",
        '"sampled_softmax" (in-batch + sampled negatives, logQ correction), "full_softmax" '
        '(cross-entropy over the whole catalogue minus the user\'s known items), "bpr", or '
        '"adaptive_softmax" (torch.nn.AdaptiveLogSoftmaxWithLoss over the catalogue).',
    )
    adaptive_cutoffs: tuple[int, ...] = setting(
        (2_000, 20_000), 'Cluster cutoffs (catalogue ranks) of "adaptive_softmax".'
    )
    adaptive_resort_steps: int = setting(
        500, 'Steps between re-sorting the "adaptive_softmax" classes by item frequency.'
    )
    ema_decay: float = setting(
        0.0,
        "Decay of an exponential moving average of the dense weights, exported instead "
        "of the raw ones (0 = off).",
    )
    lr: float = setting(0.05, "Learning rate.")
    batch_size: int = setting(64, "Samples per micro-batch gradient step.")
    num_negatives: int = setting(64, "Uniformly sampled negatives added to the in-batch ones.")
    temperature: float = setting(0.1, "Softmax temperature on the dot-product logits.")
    logq: float = setting(1.0, "Scale of the sampled-softmax logQ correction (1 = full, 0 = none).")
    transition_negatives: int = setting(
        0,
        "Hard negatives from the transition memory: this many of the newest history item's "
        "most frequent successors join each sample's candidates (0 = none).",
    )
    blend_head: int = setting(
        100,
        "With the transition memory on, the blend weights (dot-product scale, cold-vector and "
        "per-position transition weights) learn from a softmax over each sample's "
        "blend_head best-scored items + its target (0 = over the whole catalogue).",
    )
    l2: float = setting(0.0, "L2 penalty on the id embedding rows of each step's batch.")
    grad_clip: float = setting(10.0, "Clip of the gradient norm of each step (0 = off).")
    seed: int = setting(1234, "Seed of the initial weights, negative sampling and id dropout.")
    export_every_steps: int = setting(50, "Export a model version every this many steps.")
    export_every_seconds: float = setting(
        10.0,
        "Also export after this much processing time with unexported steps (checked when "
        "the trainer fires; ignored in deterministic mode).",
    )
    # The gate and rollback: models/gate.py.
    publish_gate: bool = setting(
        True,
        "Publish an exported version (LATEST, the models topic) only if it loads, answers a "
        "probe with finite scores and its prequential Recall@K since the serving version was "
        "published is within gate_tolerance of the serving version's on the same positives; "
        "else it is kept as held. false = publish every version, and no automatic rollback.",
    )
    gate_tolerance: float = setting(
        0.1, "Share of the serving version's Recall@K a candidate may fall short by and pass."
    )
    gate_floor: float = setting(
        0.5,
        "A candidate below this share of the serving version's Recall@K at publication is "
        "held unless it beats the serving version by gate_tolerance (0 = no floor).",
    )
    gate_min_events: int = setting(
        200, "Positives scored since the serving version was published before a candidate can pass."
    )
    rollback_share: float = setting(
        0.5,
        "Roll back when the serving version's recent Recall@K stays below this share of its "
        "value at publication for rollback_steps steps while the previous version scores "
        "better (0 = no automatic rollback).",
    )
    rollback_steps: int = setting(20, "Consecutive low steps before an automatic rollback.")
    flush_after_seconds: float = setting(
        5.0,
        "Train on a partial batch after this much processing time (ignored in deterministic mode).",
    )
    # Most of a step's cost is per step (ranking the catalogue, the dense update and blob),
    # so a trainer that is behind learns more samples/s in larger steps and catches up
    # sooner; at live rates steps stay at batch_size (models.online.step_due).
    catchup_factor: int = setting(
        4,
        "While samples arrive faster than the trainer learns them, a step waits for up to "
        "catchup_factor x batch_size samples (1 = fixed steps; deterministic mode always "
        "uses batch_size).",
    )
    deterministic: bool = setting(
        False,
        "Train in event-time order behind the watermark, in fixed batches, with no "
        "processing-time flushes or exports: the same input gives the same models.",
    )
    initial_state: str = setting(
        "", 'A `rtrec pretrain` output that every new model key starts from ("" = random init).'
    )
    metrics_k: int = setting(
        10, "K of the prequential (test-then-train) Recall@K and NDCG@K (models/metrics.py)."
    )
    # Page-Hinkley drift detection on the prequential loss, one observation per step.
    drift_enabled: bool = setting(True, "Detect drift in the prequential loss (Page-Hinkley).")
    drift_delta: float = setting(0.01, "Page-Hinkley tolerance per step.")
    drift_threshold: float = setting(1.5, "Page-Hinkley alarm threshold.")
    drift_min_samples: int = setting(30, "Steps before a drift alarm may fire.")
    # Short: the mean must forget the loss of the first, untrained steps.
    drift_memory: int = setting(20, "Window (steps) of the running mean of the loss.")
    drift_lr_boost: float = setting(
        1.0,
        "On a drift detection, multiply the learning rate by this for drift_boost_steps "
        "steps (1.0 = no boost).",
    )
    drift_boost_steps: int = setting(20, "Steps a drift_lr_boost lasts after a detection.")
    # Performance only: torch's CPU threads.
    # One per trainer: a Flink slot is a core, and on a busy small machine more threads
    # spin and fight the JVM for the cores, which slows the learn loop down a lot.
    torch_threads: int = setting(
        1,
        "Intra-op CPU threads of each trainer and embedding worker (torch.set_num_threads; "
        "0 = torch's default, one per core). Runs agree bit for bit only with the same "
        "thread count (float reduction order).",
        perf=True,
    )


def _default_weights() -> dict[str, float]:
    return {"view": 0.5, "click": 1.0, "cart": 1.5, "purchase": 2.0, "rating": 1.0}


@dataclass(frozen=True)
class UserStageConfig:
    """Per-user stage: the history kept per user and how events become samples.

    The towers read the newest ``model.history_length`` items (one source of truth); the
    stage keeps up to ``known_items`` so that ranking can leave out everything the user
    already interacted with, not only what the towers read.
    """

    known_items: int = setting(
        200,
        "A user's most recent positives kept as known history: ranking (eval, in-stream "
        "metrics) leaves them all out, and the towers read the newest model.history_length "
        "of them. Raised to model.history_length when lower. Bounds the per-user state.",
    )

    dedup_size: int = setting(
        256, "Event ids remembered per user: a repeated event id among them is dropped."
    )
    # One user (or a bot) must not flood the model: the excess is not learned from, and
    # goes to the dead-letter topic so that nothing disappears silently.
    max_events_per_window: int = setting(
        0,
        "Most events of one user in one job.window_ms window; the later ones go to the "
        'dead-letter topic with reason "user rate limit" (0 = no limit).',
    )
    state_ttl_hours: float = setting(
        24.0 * 30,
        "Processing-time TTL of a user's history (0 = keep forever). Expired histories are "
        "dropped as state is accessed and from full snapshots; until then one can be read.",
    )
    min_positive_rating: float = setting(
        3.5,
        "A rating r >= this is a positive of weight r / 5; a lower one is a label-0 sample.",
    )
    weights: dict[str, float] = field(
        default_factory=_default_weights, metadata=meta("Training weight per event type.")
    )
