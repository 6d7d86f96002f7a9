"""RTPurbo: head roles, indexers, the sparse attention backend, calibration, conversion and export.

See docs/rtpurbo.md. Typical flow:
    seqs = make_needle_sequences(docs, lengths=[2048], n=8, needle_tokens=64)
    roles, per_seq_scores, summary = calibrate_roles(model, seqs, cfg.rtpurbo)
    samples = collect_qk_samples(model, seqs, roles)  # on the dense model
    apply_rtpurbo(model, roles, cfg.rtpurbo)
    init_indexers_svd(model, samples)
    set_rtpurbo_mode(model, "stage1")  # ... train indexer_parameters(model) on indexer_kl_loss(ctx.collect)
"""

from models.rtpurbo.attention import RTPurboAttention, indexer_kl_stats
from models.rtpurbo.calibrate import (
    NeedleSequence,
    calibrate_retrieval_scores,
    calibrate_roles,
    collect_qk_samples,
    make_needle_sequences,
    plot_scores_heatmap,
    stability_overlap,
)
from models.rtpurbo.convert import (
    apply_rtpurbo,
    freeze_for_stage,
    indexer_kl_loss,
    indexer_parameters,
    init_indexers,
    init_indexers_svd,
    is_rtpurbo,
    iter_rtpurbo_backends,
    rtpurbo_density_report,
    set_rtpurbo_mode,
)
from models.rtpurbo.export import (
    indexer_state_dict,
    load_indexer_state_dict,
    load_rtpurbo_checkpoint,
    rtpurbo_config_section,
    save_rtpurbo_checkpoint,
)
from models.rtpurbo.indexer import LayerIndexer
from models.rtpurbo.roles import HeadRoles, RolesError, build_roles, choose_roles, model_fingerprint, roles_from_config

__all__ = [
    "HeadRoles", "RolesError", "build_roles", "choose_roles", "model_fingerprint", "roles_from_config",
    "NeedleSequence", "make_needle_sequences", "calibrate_retrieval_scores", "calibrate_roles", "collect_qk_samples",
    "stability_overlap", "plot_scores_heatmap",
    "LayerIndexer", "RTPurboAttention", "indexer_kl_stats",
    "apply_rtpurbo", "set_rtpurbo_mode", "indexer_parameters", "freeze_for_stage", "init_indexers",
    "init_indexers_svd", "indexer_kl_loss", "rtpurbo_density_report", "iter_rtpurbo_backends", "is_rtpurbo",
    "rtpurbo_config_section", "indexer_state_dict", "load_indexer_state_dict", "save_rtpurbo_checkpoint",
    "load_rtpurbo_checkpoint",
]
