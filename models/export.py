"""Model versions: a self-contained ONNX graph plus a manifest.

``model.onnx`` maps ``history_ids`` int64 [B, H] (indices into the version's item list,
newest first, 0 = padding), ``history_mask`` bool [B, H] and ``exclude_ids`` int64 [B, E]
(items never to recommend, any E, 0 = padding) to ``top_ids`` int64 [B, K] and
``top_scores`` float32 [B, K]. The item matrix is inside the graph, and the item id
strings are in the ONNX metadata (``item_ids``, a JSON list; index i+1 <-> item_ids[i]),
so ``model.onnx`` alone is enough to serve. Beside it, for approximate-nearest-neighbour
serving at larger catalogues: ``user_encoder.onnx`` (same inputs -> ``user_vector`` [B, D]),
``item_vectors.npy`` [V + 1, D] and ``item_ids.json``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import threading
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from models.metrics import summary
from models.trainer import OnlineLearner
from models.two_tower import TopKModel, TwoTower, excluded_items
from models.version import ModelVersion

ONNX_OPSET = 18
MANIFEST_FORMAT = 1


class NonFiniteModelError(RuntimeError):
    """The model holds NaN/inf values; it must not be published."""


class AsmTopKModel(nn.Module):
    """Like TopKModel, but ranks with an adaptive-softmax head (``trainer.loss`` =
    adaptive_softmax): scores [B, V + 1] = log p(class of item | user)."""

    def __init__(
        self,
        dense: TwoTower,
        item_vectors: torch.Tensor,
        asm: nn.AdaptiveLogSoftmaxWithLoss,
        classes: torch.Tensor,
        k: int,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.asm = asm
        self.register_buffer("item_rows", item_vectors)
        self.register_buffer("classes", classes)
        self.k = min(k, item_vectors.shape[0] - 1)

    input_names = TopKModel.input_names

    def forward(
        self, history_ids: torch.Tensor, history_mask: torch.Tensor, exclude_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.item_rows
        classes = self.classes
        assert isinstance(rows, torch.Tensor) and isinstance(classes, torch.Tensor)
        user = self.dense.user_vectors(rows[history_ids], history_mask.to(torch.float32))
        scores = self.asm.log_prob(user)[:, classes.clamp(min=0)]  # [B, V + 1]
        scores = scores - (classes < 0).to(scores.dtype).unsqueeze(0) * 1e9
        scores = scores - excluded_items(scores, history_ids, exclude_ids) * 1e9
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores


class UserEncoder(nn.Module):
    """history_ids [B, H] + history_mask [B, H] -> user vector [B, D] (for ANN serving)."""

    def __init__(self, dense: TwoTower, item_vectors: torch.Tensor) -> None:
        super().__init__()
        self.dense = dense
        self.register_buffer("item_rows", item_vectors)

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        rows = self.item_rows
        assert isinstance(rows, torch.Tensor)
        out: torch.Tensor = self.dense.user_vectors(
            rows[history_ids], history_mask.to(torch.float32)
        )
        return out


# Traced graphs by model signature (:func:`_signature`). A version whose modules and
# tensor shapes match an earlier one's only swaps the graph's initializers: tracing costs
# ~80-120 ms a graph and each version has two, which the trainer paid every 50 steps. A
# graph found not to depend on the number of items is keyed without it (see _onnx_proto).
# The cached graphs hold no weights (an initializer is its name only), so a 100k-item
# catalogue's ~130 MB of item vectors is not kept per entry.
_GRAPHS: OrderedDict[tuple[Any, ...], onnx.ModelProto] = OrderedDict()
_GRAPH_CACHE_SIZE = 8
_GRAPHS_LOCK = threading.Lock()  # PyFlink may run bundles of one worker in threads


def _item_axis(model: nn.Module) -> list[str]:
    """The model's own buffers with one row per exported item (``item_rows``, the
    transition memory, the never-interacted mask, adaptive-softmax classes): their first
    dimension is V + 1, which changes whenever the catalogue does."""
    rows = getattr(model, "item_rows", None)
    if not isinstance(rows, torch.Tensor):
        return []
    n = rows.shape[0]
    return [k for k, b in model.named_buffers(recurse=False) if b.dim() and b.shape[0] == n]


def _signature(
    model: nn.Module, history_length: int, outputs: list[str], any_items: bool = False
) -> tuple[Any, ...]:
    """Everything a traced graph depends on besides tensor values: module types, their
    scalar and config attributes (e.g. TopKModel.k), state shapes and dtypes, inputs.
    With ``any_items`` the number of items (:func:`_item_axis`) is left out: the key of a
    graph that was found not to depend on it."""
    mods = []
    for name, mod in model.named_modules():
        attrs: list[tuple[str, Any]] = []
        for k, v in sorted(vars(mod).items()):
            if k == "training" or k.startswith("_"):
                continue
            if isinstance(v, bool | int | float | str) or v is None:
                attrs.append((k, v))
            elif isinstance(v, list | tuple) and all(isinstance(x, int) for x in v):
                attrs.append((k, tuple(v)))
            elif k == "cfg":
                attrs.append((k, repr(v)))
        mods.append((name, type(mod).__qualname__, tuple(attrs)))
    free = set(_item_axis(model)) if any_items else set()
    state = tuple(
        (k, (-1, *v.shape[1:]) if k in free else tuple(v.shape), str(v.dtype))
        for k, v in model.state_dict().items()
    )
    return (tuple(mods), state, history_length, tuple(outputs), ONNX_OPSET, any_items)


def _trace(model: nn.Module, history_length: int, outputs: list[str]) -> onnx.ModelProto:
    ids = torch.zeros(1, history_length, dtype=torch.long)
    mask = torch.zeros(1, history_length, dtype=torch.bool)
    inputs: tuple[torch.Tensor, ...] = (ids, mask)
    names: list[str] = list(getattr(model, "input_names", ("history_ids", "history_mask")))
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in [*names, *outputs]}
    if "exclude_ids" in names:
        # Two columns: a one-column example would let the tracer fold the axis away.
        inputs = (ids, mask, torch.zeros(1, 2, dtype=torch.long))
        axes["exclude_ids"] = {0: "batch", 1: "excluded"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is much faster than dynamo here and these graphs are static.
        # Without constant folding every initializer is a named parameter or buffer (what
        # the graph cache swaps), and tracing is faster; onnxruntime folds at load time.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            buf,  # type: ignore[arg-type]  # file objects are accepted at run time
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
            do_constant_folding=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _distinct(state: dict[str, torch.Tensor]) -> bool:
    """No two tensors of ``state`` are equal (the exporter merges equal initializers into
    one, which a graph reused with other weights must not have done)."""
    seen: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for v in state.values():
        same = seen.setdefault((tuple(v.shape), v.dtype), [])
        if any(torch.equal(v, u) for u in same):
            return False
        same.append(v)
    return True


def _one_item_more(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose item-axis buffers (:func:`_item_axis`) have one row more
    (a copy of their last row): traced, it shows whether the graph depends on V."""
    grown = copy.deepcopy(model)
    for name in _item_axis(model):
        buf = getattr(grown, name)
        setattr(grown, name, torch.cat([buf, buf[-1:]]))
    return grown


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """The same nodes (ops, wiring, attributes and constants), inputs and outputs."""

    def parts(g: onnx.GraphProto) -> list[bytes]:
        return [x.SerializeToString() for x in (*g.node, *g.input, *g.output)]

    return parts(a.graph) == parts(b.graph)


def _skeleton(proto: onnx.ModelProto, any_items: bool) -> onnx.ModelProto:
    """``proto`` without weights (initializers keep their names), for the cache; a graph
    reused for other item counts also drops the traced intermediate shapes (onnxruntime
    infers them when it loads the model)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    for init in skeleton.graph.initializer:
        init.CopyFrom(onnx.TensorProto(name=init.name))
    if any_items:
        del skeleton.graph.value_info[:]
    return skeleton


def _onnx_proto(model: nn.Module, history_length: int, outputs: list[str]) -> onnx.ModelProto:
    """The model as ONNX (a proto of its own): a cached graph given this model's weights,
    else a new trace.

    A catalogue that grows changes the item-axis shapes (V + 1) of every version, so a
    cache keyed by exact shapes would trace every version of a live catalogue. On a miss
    the model is traced a second time with one item more: when both graphs are the same,
    it is cached for any number of items, else for this one only.
    """
    model = model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    keys = [_signature(model, history_length, outputs, any_items=True)]
    keys.append(_signature(model, history_length, outputs))
    with _GRAPHS_LOCK:
        key, cached = next(((k, _GRAPHS[k]) for k in keys if k in _GRAPHS), (None, None))
        if key is not None:
            _GRAPHS.move_to_end(key)
    if cached is not None:
        proto = onnx.ModelProto()
        proto.CopyFrom(cached)
        for init in proto.graph.initializer:
            init.CopyFrom(numpy_helper.from_array(state[init.name].numpy(), init.name))
        return proto
    proto = _trace(model, history_length, outputs)
    if _distinct(state) and all(i.name in state for i in proto.graph.initializer):
        any_items = bool(_item_axis(model)) and _same_graph(
            proto, _trace(_one_item_more(model), history_length, outputs)
        )
        with _GRAPHS_LOCK:
            _GRAPHS[keys[0] if any_items else keys[1]] = _skeleton(proto, any_items)
            while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
                _GRAPHS.popitem(last=False)
    return proto


def _to_onnx(model: nn.Module, history_length: int, outputs: list[str]) -> bytes:
    return bytes(_onnx_proto(model, history_length, outputs).SerializeToString())


def export_onnx(model: nn.Module, item_ids: list[str], history_length: int) -> bytes:
    """Trace a top-k model to ONNX with a dynamic batch axis; embed the item id list."""
    proto = _onnx_proto(model, history_length, ["top_ids", "top_scores"])  # a fresh copy
    entry = proto.metadata_props.add()
    entry.key = "item_ids"
    entry.value = json.dumps(item_ids)
    return bytes(proto.SerializeToString())


def _successors(
    learner: OnlineLearner, live: npt.NDArray[np.int64]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The transition memory over the exported item list: successor positions [V + 1, M]
    (0 = none) and counts [V + 1, M]; None when the memory is off."""
    if learner.model.transition_weight is None or learner.trans_m == 0:
        return None
    idx, cnt = learner.successors()
    live_t = torch.from_numpy(live).to(idx.device)
    position = torch.zeros(learner.catalog.size, dtype=torch.long, device=idx.device)
    position[live_t] = torch.arange(1, len(live) + 1, device=idx.device)
    succ = position[idx[live_t]]  # [V, M] positions in the exported list (0 = none)
    counts = cnt[live_t] * (succ > 0).to(cnt.dtype)
    m = idx.shape[1]
    return (
        torch.cat([torch.zeros(1, m, dtype=torch.long), succ.cpu()]),
        torch.cat([torch.zeros(1, m), counts.to("cpu", torch.float32)]),
    )


def build_version(
    learner: OnlineLearner, meta: dict[str, Any], top_k: int, config: dict[str, Any]
) -> ModelVersion:
    """Export the learner's current model as the next version (``meta['version'] + 1``).

    Every live catalogue item is exported (items known only from their text included);
    the item tower is applied here, so the graph holds final item vectors.
    Raises NonFiniteModelError instead of exporting a model with NaN/inf weights.
    """
    cat = learner.catalog
    live = cat.live_indices()
    with torch.no_grad():
        idx = torch.from_numpy(live).to(learner.device)
        vecs = learner.item_vectors(idx, ema=True).to("cpu", torch.float32)
    dense_src = learner.export_model()
    cpu_dense = TwoTower(dense_src.cfg, dense_src.text_dim)
    cpu_dense.load_state_dict({k: v.detach().cpu() for k, v in dense_src.state_dict().items()})
    cpu_dense.eval()
    item_matrix = torch.cat([torch.zeros(1, vecs.shape[1]), vecs])  # [V + 1, D]
    params = [*cpu_dense.parameters()] + ([*learner.asm.parameters()] if learner.asm else [])
    if not bool(torch.isfinite(item_matrix).all()) or not all(
        bool(torch.isfinite(p).all()) for p in params
    ):
        raise NonFiniteModelError(
            f"model {meta['model_key']} at step {meta['step']} has non-finite weights; not exported"
        )
    item_ids = [cat.ids[i] for i in live.tolist()]
    h = cpu_dense.cfg.history_length
    top: nn.Module
    if learner.asm is not None:
        asm = nn.AdaptiveLogSoftmaxWithLoss(
            learner.asm.in_features,
            learner.asm.n_classes,
            learner.asm.cutoffs[:-1],
            div_value=learner.asm.div_value,
        )
        asm.load_state_dict({k: v.detach().cpu() for k, v in learner.asm.state_dict().items()})
        # -1 = no output class yet (never a target): ranked last by the graph.
        cls = torch.from_numpy(cat.asm_class[live])
        classes = torch.cat([torch.zeros(1, dtype=torch.long), cls])
        top = AsmTopKModel(cpu_dense, item_matrix, asm.eval(), classes, top_k)
    else:
        cold = None
        if learner.blending:  # [V + 1] 1 = never interacted with (row 0 = padding)
            never = torch.from_numpy(cat.count[live] == 0).to(torch.float32)
            cold = torch.cat([torch.zeros(1), never])
        top = TopKModel(cpu_dense, item_matrix, top_k, _successors(learner, live), cold)
    onnx_bytes = export_onnx(top, item_ids, h)
    buf = io.BytesIO()
    np.save(buf, item_matrix.numpy())
    extras = {
        "user_encoder.onnx": _to_onnx(UserEncoder(cpu_dense, item_matrix), h, ["user_vector"]),
        "item_vectors.npy": buf.getvalue(),
        "item_ids.json": json.dumps(item_ids).encode(),
    }
    version = meta["version"] + 1
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model_key": meta["model_key"],
        "version": version,
        "steps": meta["step"],
        "events_seen": meta["events_seen"],
        "positives_trained": meta["positives_trained"],
        "event_time_hwm_ms": meta["hwm_ts"],
        "num_items": len(item_ids),
        "num_id_rows": len(learner.table),
        "items_with_text": int(cat.has_text[live].sum()) if len(live) else 0,
        "top_k": min(top_k, len(item_ids)),
        "history_length": h,
        "scoring": "adaptive_softmax" if learner.asm is not None else "dot",
        "metrics": {
            "train_loss_ema": _finite_or_none(meta["loss_ema"]),
            "prequential_recall10_ema": _finite_or_none(meta["recall10_ema"]),
            "non_finite_skips": meta["non_finite_skips"],
            "oov_targets": meta["oov"],
            "expired_rows": meta.get("expired_rows", 0),
            "targets_without_text": meta.get("targets_without_text", 0),
            "items_ingested": meta.get("items_ingested", 0),
            # Test-then-train Recall@K / NDCG@K / MRR / loss: cumulative and recent (EMA),
            # and the drift detector's detections (models/metrics.py).
            "prequential": summary(meta),
        },
        "files": sorted(["model.onnx", *extras]),
        "config": config,
        "content_hash": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    return ModelVersion(meta["model_key"], version, onnx_bytes, manifest, extras)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
