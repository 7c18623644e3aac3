"""Small in-memory sample streams with a learnable structure (topics)."""

from __future__ import annotations

import random

from models.history import Sample


def topic_samples(
    n: int, seed: int = 0, topics: int = 5, per_topic: int = 20, model_key: str = "m"
):
    """Users stick to one topic; items t{topic}_{i}; histories from the same topic."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        u = rng.randrange(50)
        t = u % topics
        hist = tuple(f"t{t}_{rng.randrange(per_topic)}" for _ in range(rng.randrange(1, 8)))
        out.append(
            Sample(
                model_key,
                f"u{u}",
                hist,
                f"t{t}_{rng.randrange(per_topic)}",
                1,
                1.0,
                1000 + k,
                f"e{k}",
            )
        )
    return out
