"""JobConfig: one dataclass per TOML section, TorchTitan (v0.2, TOML era) shape.

Every field has a default; a TOML file overrides the defaults and `--section.key value` on the command
line overrides the TOML. Unknown sections/keys and values of the wrong type are errors (see manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    config_file: str = ""
    dump_folder: str = "./outputs"
    description: str = ""
    # What the one training loop does: pretrain (full attention LM), calibrate (head roles),
    # stage1 (train RTPurbo indexers), stage2 (self-distillation), eval (long-context suite),
    # pipeline (calibrate -> stage1 -> stage2 -> eval, the README's main job).
    mode: str = "pretrain"
    # mode = "pipeline": the stage configs to run in order (each a normal TOML of this schema). Command-line
    # overrides given to the pipeline apply to every stage.
    pipeline_stages: list[str] = field(default_factory=list)
    seed: int = 0
    deterministic: bool = False
    print_config: bool = False


@dataclass
class Model:
    name: str = "qwen3"
    flavor: str = "debug"
    tokenizer_path: str = "assets/tokenizer/stdlib_sp4096.model"
    # Load weights from a Hugging Face checkpoint directory (safetensors + config.json) before training.
    # When set, the architecture comes from that config.json and `flavor` is ignored.
    hf_checkpoint: str = ""
    # Dense attention backend for full-attention heads: "sdpa" or "flex".
    attn_backend: str = "sdpa"
    # Override the flavour's vocab size (0 = the flavour's own; debug flavours take the tokenizer's).
    vocab_size: int = 0
    max_seq_len: int = 0


@dataclass
class Training:
    dataset: str = "stdlib"  # "stdlib", a path/glob of .txt/.jsonl files, or "mix" (stdlib + synthetic tasks)
    dataset_split: str = "train"
    # How data-parallel ranks split the data: "document" (each rank packs its own documents) or "sample"
    # (rank r takes packed windows r, r+dp, ...: the global batch is then identical for any dp degree).
    dataset_shard_by: str = "document"
    # Share of training windows drawn from the synthetic long-context tasks' TRAINING split (0 = none);
    # their labels cover only the answers. Prompt lengths are drawn from synthetic_lengths (tokens).
    synthetic_fraction: float = 0.0
    synthetic_lengths: list[int] = field(default_factory=list)  # empty: seq_len/4, seq_len/2, seq_len
    synthetic_workers: int = 0  # >0: build synthetic windows in that many worker processes (same stream)
    seq_len: int = 512
    # Packed documents: per-document RoPE positions and a document-causal mask (no attention across EOS).
    document_mask: bool = True
    local_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    steps: int = 100
    # >0: stop after this many seconds of training even if `steps` are not done (checked after every step,
    # agreed across ranks), then validate / save / export as at the last step. A safety net for fixed-length
    # device sessions; the LR schedule still follows `steps`.
    time_limit_s: float = 0.0
    max_norm: float = 1.0
    # >0: that many held-out batches (val documents + held-out synthetic tasks) are scored before and after
    # training (val/* metrics, and "validation" in loss_history_<mode>.json)
    val_batches: int = 0
    mixed_precision_param: str = "bfloat16"  # used on CUDA only; CPU trains in float32
    mixed_precision_reduce: str = "float32"


@dataclass
class Optimizer:
    name: str = "AdamW"  # "AdamW", or torchao's "AdamW8bit" / "AdamW4bit" / "AdamWFp8"
    lr: float = 8e-4
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1


@dataclass
class LRScheduler:
    warmup_steps: int = 10
    decay_type: str = "cosine"  # "cosine", "linear" or "constant"
    min_lr_factor: float = 0.1


@dataclass
class Parallelism:
    data_parallel_shard_degree: int = -1  # -1: all ranks not used by other dims
    data_parallel_replicate_degree: int = 1
    # ranks that share every sequence (context parallelism, load-balanced chunks; training modes only,
    # training.seq_len >= 2 x this; FSDP then shards over dp_shard x cp). docs/configs.md
    context_parallel_degree: int = 1
    fsdp_reshard_after_forward: str = "default"  # "default", "always", "never"


@dataclass
class Checkpoint:
    enable: bool = False
    folder: str = "checkpoint"
    interval: int = 500
    async_mode: str = "disabled"  # "disabled" or "async" (GPU)
    keep_latest_k: int = 0  # 0 keeps all
    load_step: int = -1  # -1: latest complete checkpoint in folder
    # Export the final model as a Hugging Face checkpoint into dump_folder/<export_folder>.
    export_hf: bool = False
    export_folder: str = "hf_export"
    export_dtype: str = "float32"
    export_max_shard_mb: int = 5120  # safetensors shard size of the export (small shards travel easier)


@dataclass
class Metrics:
    log_freq: int = 10
    enable_tensorboard: bool = True
    save_tb_folder: str = "tb"


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # "none", "full", "selective"
    selective_ac_option: str = "2"  # every N-th block, as in TorchTitan


@dataclass
class Compile:
    enable: bool = False
    components: list[str] = field(default_factory=lambda: ["model"])


@dataclass
class RTPurbo:
    # Head roles
    roles_file: str = ""  # JSON written by calibration; the model obeys it (users may edit it)
    granularity: str = "query_head"  # "query_head" (paper) or "kv_head" (saves KV memory under GQA)
    retrieval_ratio: float = 0.15
    retrieval_threshold: float = -1.0  # >= 0: choose by score threshold instead of ratio
    window: int = 8192
    sinks: int = 4
    # Indexer
    indexer_dim: int = 16
    indexer_init: str = "svd"  # "svd" (from the head's own pre-RoPE q/k) or "random"
    # [] = the paper's position-free indexer; [min, max] = rotary indexer: qi / ki rotated by position with
    # indexer_dim / 2 periods from min to max tokens (models/rtpurbo/indexer.py; docs/results.md 4h)
    indexer_rope_periods: list[float] = field(default_factory=list)
    top_p: float = 0.9
    block_size: int = 64
    q_block_size: int = 128  # query-block granularity of sparse prefill selection (FlexAttention's Q block)
    select_mode: str = "mean"  # sparse prefill block mass: "mean" of per-query softmaxes or "pooled" queries
    prefill: str = "dense"  # retrieval heads in prefill/training forward: "dense" (paper) or "sparse"
    # Calibration
    calib_num_sequences: int = 10
    calib_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    calib_needle_tokens: int = 64
    # Stage 1
    # "full": KL to the full attention; "topp": to its own top-p set; "far": both restricted to the keys beyond
    # the local window and sinks (the keys selection decides)
    stage1_target: str = "full"
    stage1_query_chunk: int = 256
    # Post-stage-1 indexer sharpening (models/rtpurbo/sharpen.py): "none" (default: the stage-1 indexer as
    # trained) or "calibrate": per retrieval head, measure the kept density and the captured true-attention
    # mass of the selection at each factor of sharpen_factors (indexer scores x f) on sharpen_num_sequences
    # calibration sequences, pick the largest factor that keeps >= sharpen_min_mass of the mass captured at
    # factor 1, and fold it into that head's wq before the stage-1 export (report: <dump>/indexer_sharpen.json)
    indexer_sharpen: str = "none"
    sharpen_factors: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0])
    sharpen_min_mass: float = 0.98
    sharpen_num_sequences: int = 4
    sharpen_query_chunk: int = 256
    # Stage 2
    stage2_loss: str = "topk"  # "topk" (paper, k = stage2_topk) or "full"
    stage2_topk: int = 10
    stage2_label_tokens: int = 0  # 0: every position is a label token; N: the last N positions
    stage2_retrieval: str = "dense"  # retrieval heads during stage 2: "dense" or "topp"
    # Where the adapted model comes from / goes (stage1 -> stage2 -> eval chain within one dump_folder)
    init_checkpoint: str = ""  # HF checkpoint with an rtpurbo section to start from


@dataclass
class Eval:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    samples_per_task: int = 8
    tasks: list[str] = field(default_factory=lambda: ["all"])
    seed: int = 1234
    max_new_tokens: int = 0  # 0: the answer's own token count + a margin
    # "teacher_forced": one forward per sample (identical to greedy for exact-match tasks, a lower bound for
    # list tasks); "greedy": decode token by token (a full forward per token: slow without a KV cache).
    scoring: str = "teacher_forced"
    batch_size: int = 4
    perplexity_seq_len: int = 0  # 0: no perplexity
    perplexity_max_docs: int = 4
    perplexity_max_windows: int = 8  # seq_len windows scored in all (the longest documents come first)
    # Models of the comparison to leave out: dense is always run; streaming, duo, topk, rtpurbo_s1.
    skip_models: list[str] = field(default_factory=list)
    # Also evaluate "rtpurbo_fp8": the stage-2 model with its decode rows' indexer keys rounded as the inference
    # engine's float8_e4m3fn indexer cache stores them (indexer_cache_dtype="float8_e4m3fn"). Off: one more
    # RTPurbo evaluation (no perplexity) would lengthen the CPU main job.
    indexer_fp8: bool = False


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    rtpurbo: RTPurbo = field(default_factory=RTPurbo)
    eval: Eval = field(default_factory=Eval)
