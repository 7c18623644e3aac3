"""Typed, frozen configuration for the model, the trainer and the per-user stage.

These dataclasses are pure Python so that ``models`` stays free of Flink; the job's
full configuration (``flink_job.config``) composes them with Kafka and job settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the two-tower model.

    dim: embedding width D of item and user vectors (the text embedding T is projected to D).
    history_length: H, the number of most recent items the user tower reads.
    hidden: width of the user-tower MLP.
    max_items: capacity of the dynamic id vocabulary (rows, excluding the pad row).
    init_std: std of the normal init of new id rows.
    """

    dim: int = 32
    history_length: int = 20
    hidden: int = 64
    max_items: int = 100_000
    init_std: float = 0.05
    # "minilm" (bundled all-MiniLM-L6-v2), "none" (id-only items) or a local HF model dir.
    text_encoder: str = "minilm"
    text_max_length: int = 64
    # The transformer's arithmetic when embedding item texts: "auto" (bfloat16 where the
    # CPU or GPU computes it natively, else float32), "float32" or "bfloat16".
    text_precision: str = "auto"
    # Hashed category embeddings (0 disables).
    category_buckets: int = 64
    dropout: float = 0.0
    # User tower: "attention" (static-query attention pooling + newest item + MLP) or
    # "sequence" (one self-attention block over the recent items, read at the newest one,
    # plus a learned item-to-item transition map from the newest items).
    user_tower: str = "attention"
    # Recent items that feed the transition map of the "sequence" tower.
    transition_items: int = 3
    # Item-to-item transition memory learned online: each id row keeps its
    # ``transition_slots`` strongest neighbours (catalogue index + count; 0 = off), and
    # the score of item j adds sum_p w_p * log(1 + count(h_p -> j)) over the
    # ``transition_window`` newest history items h_p, with w learned by the loss.
    transition_slots: int = 64
    transition_window: int = 10
    # Each positive counts "h_d -> target" for its ``transition_pairs`` newest history items
    # h_d (d = 0 newest) with weight 1 / (d + 1), and with ``transition_symmetric`` also
    # "target -> h_d" (co-occurrence within a short span is evidence in both directions).
    transition_pairs: int = 3
    transition_symmetric: bool = True
    # Probability of hiding an item's id embedding in training, so the text/category part
    # must rank items on its own (what a brand-new item has) - DropoutNet-style cold start.
    id_dropout: float = 0.25
    # Id lifecycle: interactions before an item gets its own id row (below: text only),
    # and event time without interactions after which the row is dropped (0 = never).
    admission_threshold: int = 1
    expiry_ms: int = 0


@dataclass(frozen=True)
class TrainerConfig:
    """How the online trainer learns.

    optimizer: "adagrad" (row-wise for sparse rows), "sgd" or "adam" (dense part).
    batch_size: samples per micro-batch gradient step.
    num_negatives: uniformly sampled negatives added to the in-batch ones.
    temperature: softmax temperature on dot-product logits.
    export_every_steps / export_every_seconds: when to publish a model version
    (whichever comes first; seconds are processing time and ignored in deterministic mode).
    """

    optimizer: str = "adagrad"
    # "sampled_softmax" (in-batch + sampled negatives, logQ correction), "bpr", or
    # "adaptive_softmax" (torch.nn.AdaptiveLogSoftmaxWithLoss over the catalogue).
    loss: str = "sampled_softmax"
    adaptive_cutoffs: tuple[int, ...] = (2_000, 20_000)
    adaptive_resort_steps: int = 500
    ema_decay: float = 0.0
    lr: float = 0.05
    batch_size: int = 64
    num_negatives: int = 64
    temperature: float = 0.1
    # Scale of the sampled-softmax logQ correction (1 = full, 0 = none).
    logq: float = 1.0
    # Hard negatives from the transition memory: per sample, this many of the newest
    # history item's most frequent successors join the candidates (0 = none).
    transition_negatives: int = 0
    # With the transition memory on, the blend weights (dot-product scale, transition and
    # popularity weights) learn from a softmax over each sample's `blend_head` best-scored
    # items + its target (0 = over the whole catalogue).
    blend_head: int = 100
    l2: float = 0.0
    grad_clip: float = 10.0
    seed: int = 1234
    export_every_steps: int = 50
    export_every_seconds: float = 10.0
    flush_after_seconds: float = 5.0
    # Catch-up steps: while samples arrive faster than the trainer learns them (a backlog,
    # a burst), a step waits for up to catchup_factor x batch_size samples instead of
    # batch_size (models.online.step_due). Most of a step's cost is per step (ranking the
    # catalogue, the dense update and blob), so a trainer that is behind learns ~1.7x as
    # many samples/s in 4x larger steps and catches up sooner; at live rates steps stay at
    # batch_size. 1 = fixed steps. Deterministic mode always uses batch_size.
    catchup_factor: int = 4
    deterministic: bool = False
    # Intra-op CPU threads of each trainer (torch.set_num_threads; 0 = torch's default, one
    # per core). One per trainer: a Flink slot is a core, and on a busy 2-core machine two
    # threads made the learn loop up to 30x slower (spinning threads fight the JVM). Runs
    # agree bit for bit only with the same thread count (float reduction order).
    torch_threads: int = 1
    # A `rtrec pretrain` output: every new model key starts from it ("" = random init).
    initial_state: str = ""
    # Prequential metrics (test-then-train, models/metrics.py): Recall@K / NDCG@K at this K.
    metrics_k: int = 10
    # Page-Hinkley drift detection on the prequential loss (one observation per step):
    # tolerance per step, alarm threshold, steps before it may fire, running-mean window.
    drift_enabled: bool = True
    drift_delta: float = 0.01
    drift_threshold: float = 1.5
    drift_min_samples: int = 30
    drift_memory: int = 20  # short: the mean must forget the loss of the first, untrained steps
    # On a detection, multiply the learning rate by drift_lr_boost for drift_boost_steps
    # steps (1.0 = no boost).
    drift_lr_boost: float = 1.0
    drift_boost_steps: int = 20


@dataclass(frozen=True)
class UserStageConfig:
    """Per-user stage: history kept per user and how events become samples.

    The history length is ``ModelConfig.history_length`` (one source of truth).

    weights: training weight per event type; a rating r becomes a positive with
    weight r / 5 when r >= min_positive_rating, else a label-0 sample.
    """

    dedup_size: int = 256
    # Processing-time TTL of a user's history (0 = keep forever). Expired histories are
    # dropped as state is accessed and from full snapshots; until then one can be read.
    state_ttl_hours: float = 24.0 * 30
    min_positive_rating: float = 3.5
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "view": 0.5,
            "click": 1.0,
            "cart": 1.5,
            "purchase": 2.0,
            "rating": 1.0,
        }
    )
