"""Head roles (retrieval vs local) for RTPurbo: choosing them from calibration scores, and the JSON file.

The roles file is the contract between calibration and every later stage: the converted model obeys it,
and a user may edit it (flip a 0 to a 1 in "retrieval") to override the calibration. Roles are always
stored per *query* head; at granularity "kv_head" every KV group is all-retrieval or all-local (checked).

JSON layout (one file, human-editable):

    {
      "format": "rtpurbo-roles/1",
      "granularity": "query_head" | "kv_head",
      "ratio": 0.15 | null, "threshold": null | float,
      "window": 8192, "sinks": 4,
      "method": "needle-repeat ...",
      "fingerprint": {"n_layers": .., "n_heads": .., "n_kv_heads": .., "head_dim": .., "dim": .., "vocab_size": ..},
      "scores":    [[R_h for each query head] for each layer],
      "retrieval": [[0/1 for each query head] for each layer],
      "extra": {...}
    }
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "rtpurbo-roles/1"
FINGERPRINT_KEYS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "dim", "vocab_size")
GRANULARITIES = ("query_head", "kv_head")


class RolesError(ValueError):
    """A roles file that cannot be used (malformed, or from another model)."""


def model_fingerprint(model_args: Any) -> dict[str, int]:
    """The architecture facts a roles file must match (not weights: stage-2-adapted weights still match)."""
    return {k: int(getattr(model_args, k)) for k in FINGERPRINT_KEYS}


def _as_nested_floats(scores: Any) -> list[list[float]]:
    if hasattr(scores, "tolist"):
        scores = scores.tolist()
    return [[float(x) for x in row] for row in scores]


def choose_roles(
    scores: Any,
    *,
    ratio: float | None = None,
    threshold: float | None = None,
    granularity: str = "query_head",
    n_kv_heads: int,
) -> list[list[bool]]:
    """Pick retrieval heads from calibration scores [L][Hq] -> retrieval mask [L][Hq] (per query head).

    query_head: the top round(ratio * L * Hq) query heads over the whole model (the paper: a global top
      ~15%), or every head with score >= threshold.
    kv_head: a KV head's score is the MAX of its query heads' scores (its cache must stay full as soon as
      one of its query heads retrieves, so the strongest query head decides; a mean would let one strong
      retrieval head be diluted by its local siblings). The top round(ratio * L * Hkv) KV heads (or those
      with max >= threshold) become retrieval, and all their query heads are marked retrieval.
    Exactly one of ratio / threshold must be given. A positive ratio always keeps at least one head.
    Ties are broken by (layer, head) order, so the result is deterministic.
    """
    if granularity not in GRANULARITIES:
        raise RolesError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if (ratio is None) == (threshold is None):
        raise RolesError("choose_roles needs exactly one of ratio= or threshold=")
    s = _as_nested_floats(scores)
    L = len(s)
    Hq = len(s[0]) if L else 0
    if any(len(row) != Hq for row in s):
        raise RolesError("scores must be a rectangular [n_layers][n_heads] table")
    if n_kv_heads <= 0 or Hq % n_kv_heads:
        raise RolesError(f"n_heads={Hq} is not a multiple of n_kv_heads={n_kv_heads}")
    g = Hq // n_kv_heads
    if granularity == "query_head":
        units = [(s[l][h], l, (h,)) for l in range(L) for h in range(Hq)]
    else:
        units = [
            (max(s[l][kv * g:(kv + 1) * g]), l, tuple(range(kv * g, (kv + 1) * g)))
            for l in range(L) for kv in range(n_kv_heads)
        ]
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise RolesError(f"retrieval ratio must be in [0, 1], got {ratio}")
        n = int(round(ratio * len(units)))
        if ratio > 0:
            n = max(n, 1)
        order = sorted(range(len(units)), key=lambda i: (-units[i][0], i))
        chosen = set(order[:n])
    else:
        chosen = {i for i, u in enumerate(units) if u[0] >= threshold}
    out = [[False] * Hq for _ in range(L)]
    for i in chosen:
        _, l, heads = units[i]
        for h in heads:
            out[l][h] = True
    return out


@dataclass
class HeadRoles:
    scores: list[list[float]]  # [L][Hq] retrieval score R_h per query head
    retrieval: list[list[bool]]  # [L][Hq] True = retrieval head (full KV + indexer), False = local
    granularity: str = "query_head"
    ratio: float | None = 0.15
    threshold: float | None = None
    window: int = 8192
    sinks: int = 4
    method: str = ""
    fingerprint: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.scores = _as_nested_floats(self.scores)
        self.retrieval = [[bool(x) for x in row] for row in self.retrieval]
        self.validate()

    # ---- shape / queries ----
    @property
    def n_layers(self) -> int:
        return len(self.retrieval)

    @property
    def n_heads(self) -> int:
        return len(self.retrieval[0]) if self.retrieval else 0

    @property
    def n_kv_heads(self) -> int:
        return int(self.fingerprint.get("n_kv_heads", self.n_heads))

    def retrieval_heads(self, layer: int) -> list[int]:
        return [h for h, r in enumerate(self.retrieval[layer]) if r]

    def local_heads(self, layer: int) -> list[int]:
        return [h for h, r in enumerate(self.retrieval[layer]) if not r]

    def num_retrieval(self) -> int:
        return sum(sum(row) for row in self.retrieval)

    def retrieval_fraction(self) -> float:
        total = self.n_layers * self.n_heads
        return self.num_retrieval() / total if total else 0.0

    def kv_retrieval(self, layer: int) -> list[bool]:
        """Per KV head: does it need a full cache (any of its query heads is a retrieval head)?"""
        g = self.n_heads // self.n_kv_heads
        row = self.retrieval[layer]
        return [any(row[kv * g:(kv + 1) * g]) for kv in range(self.n_kv_heads)]

    def full_kv_fraction(self) -> float:
        """Fraction of (layer, KV head) caches that must be kept in full: what KV memory actually costs."""
        n = sum(sum(self.kv_retrieval(l)) for l in range(self.n_layers))
        return n / (self.n_layers * self.n_kv_heads) if self.n_layers else 0.0

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise RolesError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        L, H = len(self.retrieval), self.n_heads
        if len(self.scores) != L or any(len(r) != H for r in self.scores) or any(len(r) != H for r in self.retrieval):
            raise RolesError(
                f"scores and retrieval must both be [n_layers][n_heads]; got scores "
                f"{[len(r) for r in self.scores]} and retrieval {[len(r) for r in self.retrieval]}"
            )
        if self.fingerprint:
            fp = self.fingerprint
            if fp.get("n_layers", L) != L or fp.get("n_heads", H) != H:
                raise RolesError(f"roles table is {L}x{H} but the fingerprint says "
                                 f"{fp.get('n_layers')}x{fp.get('n_heads')}")
        if self.granularity == "kv_head" and H:
            if H % self.n_kv_heads:
                raise RolesError(f"n_heads={H} is not a multiple of n_kv_heads={self.n_kv_heads}")
            g = H // self.n_kv_heads
            for l, row in enumerate(self.retrieval):
                for kv in range(self.n_kv_heads):
                    grp = row[kv * g:(kv + 1) * g]
                    if any(grp) and not all(grp):
                        raise RolesError(
                            f"granularity 'kv_head' but layer {l} KV head {kv} mixes retrieval and local query "
                            f"heads {list(range(kv * g, (kv + 1) * g))}: mark the whole group, or set "
                            f"granularity to 'query_head'"
                        )

    def check_matches(self, model_args: Any) -> None:
        """Raise RolesError naming both fingerprints if these roles come from a different architecture."""
        mine = model_fingerprint(model_args)
        theirs = dict(self.fingerprint)
        if not theirs:
            theirs = {"n_layers": self.n_layers, "n_heads": self.n_heads}
        diff = {k: (theirs[k], mine[k]) for k in theirs if k in mine and theirs[k] != mine[k]}
        if self.n_layers != mine["n_layers"] or self.n_heads != mine["n_heads"]:
            diff.setdefault("table", ((self.n_layers, self.n_heads), (mine["n_layers"], mine["n_heads"])))
        if diff:
            src = self.extra.get("source_file", "<in memory>")
            raise RolesError(
                f"head roles from {src} do not match this model: roles fingerprint {theirs} vs model "
                f"fingerprint {mine} (differs in {sorted(diff)})"
            )

    # ---- RTP-LLM ----
    def headwise_config(self, seqlen_threshold: int | None = None) -> dict[str, Any]:
        """RTP-LLM's `headwise_config` for config.json: per layer a 0/1 list over query heads (1 = retrieval).

        seqlen_threshold: RTP-LLM uses full attention for every head below this KV length. Default: the
        window + sinks (below that a local head sees everything anyway), unless set in extra.
        """
        if seqlen_threshold is None:
            seqlen_threshold = int(self.extra.get("seqlen_threshold", self.window + self.sinks))
        cfg: dict[str, Any] = {
            "sink_token_num": int(self.sinks),
            "swa_token_num": int(self.window),
            "seqlen_threshold": int(seqlen_threshold),
        }
        for l, row in enumerate(self.retrieval):
            cfg[str(l)] = [int(x) for x in row]
        return cfg

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retrieval"] = [[int(x) for x in row] for row in self.retrieval]
        d["extra"] = {k: v for k, v in self.extra.items() if k != "source_file"}
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> "HeadRoles":
        if not isinstance(d, dict):
            raise RolesError(f"{source}: expected a JSON object at the top level")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise RolesError(f"{source}: unknown roles format {fmt!r} (expected {FORMAT!r})")
        for key in ("retrieval",):
            if key not in d:
                raise RolesError(f"{source}: missing key {key!r}")
        retrieval = d["retrieval"]
        if not isinstance(retrieval, list) or not all(isinstance(r, list) for r in retrieval):
            raise RolesError(f"{source}: key 'retrieval' must be a list of per-layer lists of 0/1")
        for l, row in enumerate(retrieval):
            for h, x in enumerate(row):
                if x not in (0, 1, True, False):
                    raise RolesError(f"{source}: key 'retrieval'[{l}][{h}] must be 0 or 1, got {x!r}")
        scores = d.get("scores")
        if scores is None:  # a hand-written file may omit scores
            scores = [[float(x) for x in row] for row in retrieval]
        known = {"format", "scores", "retrieval", "granularity", "ratio", "threshold", "window", "sinks",
                 "method", "fingerprint", "extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RolesError(f"{source}: unknown keys {unknown}")
        try:
            extra = dict(d.get("extra") or {})
            extra["source_file"] = source
            return cls(
                scores=scores,
                retrieval=retrieval,
                granularity=d.get("granularity", "query_head"),
                ratio=d.get("ratio"),
                threshold=d.get("threshold"),
                window=int(d.get("window", 8192)),
                sinks=int(d.get("sinks", 4)),
                method=str(d.get("method", "")),
                fingerprint={k: int(v) for k, v in (d.get("fingerprint") or {}).items()},
                extra=extra,
            )
        except RolesError as e:
            raise RolesError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise RolesError(f"{source}: malformed roles file: {e}") from None

    def save_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "HeadRoles":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RolesError(f"cannot read roles file {path}: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RolesError(f"roles file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=str(path))

    def summary(self) -> str:
        lines = [
            f"{self.num_retrieval()} / {self.n_layers * self.n_heads} query heads are retrieval heads "
            f"({100 * self.retrieval_fraction():.1f}%, granularity {self.granularity}); full KV caches: "
            f"{100 * self.full_kv_fraction():.1f}% of (layer, KV head)"
        ]
        for l in range(self.n_layers):
            heads = self.retrieval_heads(l)
            lines.append(f"  layer {l:3d}: {len(heads):3d} retrieval {heads}")
        return "\n".join(lines)


def build_roles(
    scores: Any,
    *,
    model_args: Any,
    granularity: str = "query_head",
    ratio: float | None = 0.15,
    threshold: float | None = None,
    window: int = 8192,
    sinks: int = 4,
    method: str = "",
    extra: dict[str, Any] | None = None,
) -> HeadRoles:
    """Scores -> HeadRoles for `model_args` (ratio is ignored when threshold is given)."""
    if threshold is not None and threshold >= 0:
        ratio = None
    else:
        threshold = None
    retrieval = choose_roles(scores, ratio=ratio, threshold=threshold, granularity=granularity,
                             n_kv_heads=int(model_args.n_kv_heads))
    return HeadRoles(
        scores=_as_nested_floats(scores), retrieval=retrieval, granularity=granularity, ratio=ratio,
        threshold=threshold, window=int(window), sinks=int(sinks), method=method,
        fingerprint=model_fingerprint(model_args), extra=dict(extra or {}),
    )


def roles_from_config(scores: Any, model_args: Any, cfg: Any, *, method: str = "", extra=None) -> HeadRoles:
    """Scores -> HeadRoles using an RTPurbo config section (retrieval_ratio / retrieval_threshold ...)."""
    thr = float(cfg.retrieval_threshold)
    return build_roles(
        scores, model_args=model_args, granularity=cfg.granularity,
        ratio=float(cfg.retrieval_ratio), threshold=thr if thr >= 0 else None,
        window=int(cfg.window), sinks=int(cfg.sinks), method=method, extra=extra,
    )
