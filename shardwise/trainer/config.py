"""Typed configuration schema.

Every group of the Hydra config (`model`, `parallel`, `optim`, `data`, `trainer`, `logging`) is a
dataclass below; `zero`, `offload`, `co2` and `fault_tolerance` live beside their code (`shardwise.parallel.zero.config`,
`shardwise.offload.config`, `shardwise.parallel.co2.config`, `shardwise.fault_tolerance.config`). All are registered in Hydra's ConfigStore by `register_schemas()`. Recipes under `recipes/`
only set values; the schema gives types (OmegaConf rejects a string where an int is expected) and the
docstring of each field is its documentation. Cross-field rules live in `validate.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from ..fault_tolerance.config import FaultToleranceConfig
from ..fault_tolerance.resume import ResumeMode
from ..offload.config import OffloadConfig
from ..parallel.co2.config import CO2Config
from ..parallel.zero.config import ZeroConfig
from .choices import Attention, Backend, Device, PPPartition, PPSchedule, Precision, RouteGroupScore, RouterScore


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward settings. `num_experts: 0` makes every layer dense."""

    num_experts: int = 0
    """Routed experts per MoE layer. 0 = dense model (plain SwiGLU MLP in every layer)."""
    top_k: int = 2
    """Experts each token is sent to."""
    expert_ffn_hidden_size: Optional[int] = None
    """Inner (SwiGLU) width of one routed expert; null = model.ffn_hidden_size."""
    shared_experts: int = 0
    """DeepSeek-style always-on experts; their MLP has width shared_experts * expert_ffn_hidden_size."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Inner width of the shared-expert MLP; null = shared_experts * expert_ffn_hidden_size. Qwen2-MoE's
    shared_expert_intermediate_size need not be a multiple of the routed width."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(x . g), g a learned vector (Qwen2-MoE)."""
    capacity_factor: Optional[float] = None
    """Per-expert capacity = ceil(capacity_factor * tokens * top_k / num_experts); assignments over
    capacity are dropped (lowest router probability first) and the token keeps only its residual.
    null = dropless (every assignment is computed)."""
    router_score: RouterScore = RouterScore.softmax
    """Router scoring function: `softmax` over all experts, then top-k (Mixtral), or `sigmoid` per expert,
    top-k, selected scores renormalised (DeepSeek-V3; the aux loss uses the scores normalised over experts)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): > 0 keeps a per-expert bias added to the scores for the
    top-k selection only, moved by this rate * sign(mean load - expert load) after every step from the
    global per-expert counts (DeepSeek-V3 uses 0.001). 0 = off. Usually combined with a small aux_loss_coef."""
    norm_topk_prob: bool = True
    """Renormalise the k selected probabilities to sum to 1 (Mixtral) instead of using raw scores."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights (after the renormalisation): DeepSeek-V3 uses 2.5."""
    route_groups: int = 1
    """Node-limited routing (DeepSeek-V3 n_group): the experts form this many contiguous groups (set it to
    parallel.ep, or the nodes an ep group spans, so a group is where its experts live). 1 = off."""
    route_groups_per_token: Optional[int] = None
    """A token's experts come from at most this many groups (DeepSeek-V3 topk_group), those with the
    highest group scores; null = route_groups (plain top-k)."""
    route_group_score: RouteGroupScore = RouteGroupScore.top2
    """Score of a group for node-limited routing: `top2` = sum of its two highest selection scores
    (DeepSeek-V3; bias included), `max` = its highest score (DeepSeek-V2 group_limited_greedy)."""
    seq_aux_loss_coef: float = 0.0
    """DeepSeek-V3's complementary sequence-wise balance loss weight alpha: per sequence of T tokens,
    alpha * sum_e f_e * P_e with f_e = E/(k*T) * (assignments to e), P_e = mean_t p_te; averaged over the
    micro-batch's sequences (alpha when balanced). 0 = off."""
    aux_loss_coef: float = 0.01
    """Switch/GShard load-balancing loss weight: coef * E/(k*T^2) * sum_e (sum_t p_te) * count_e."""
    z_loss_coef: float = 0.001
    """Router z-loss weight (ST-MoE): coef * mean_t logsumexp(logits_t)^2."""
    first_dense_layers: int = 0
    """The first N decoder layers use a dense MLP instead of MoE (DeepSeek-MoE keeps layer 0 dense)."""


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), used when model.attention = mla. Per head, queries and
    keys are [nope_head_dim (from the latent) | rope_head_dim (rotated)], values v_head_dim; keys and values
    come from one compressed latent of kv_lora_rank per token plus one rotated key shared by all heads."""

    kv_lora_rank: int = 64
    """Width of the compressed key/value latent (DeepSeek-V2-Lite / V3: 512)."""
    q_lora_rank: Optional[int] = None
    """Width of the compressed query latent; null = queries projected straight from the hidden state
    (DeepSeek-V2-Lite), V3: 1536."""
    rope_head_dim: int = 16
    """Rotated (decoupled RoPE) part of each query/key head; the rotated key is shared by the heads (64)."""
    nope_head_dim: int = 32
    """Non-rotated part of each query/key head (128)."""
    v_head_dim: int = 32
    """Value width per head (128)."""


@dataclass
class ModelConfig:
    """Llama-style decoder; MoE when `moe.num_experts > 0`."""

    name: str = "tiny"
    """Free-form model name, used in logs and run names."""
    vocab_size: int = 320
    """Embedding rows. Must be >= the tokenizer's vocabulary (the byte tokenizer has 257 ids)."""
    hidden_size: int = 128
    """Model width d."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Query heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null = num_heads (MHA). Must divide num_heads."""
    ffn_hidden_size: int = 344
    """SwiGLU inner width of the dense MLP."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables are built for; must be >= data.seq_len."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init of weights; output projections are scaled by 1/sqrt(2*num_layers)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings."""
    attention: Attention = Attention.mha
    """`mha`: grouped-query attention of head_dim = hidden_size / num_heads; `mla`: DeepSeek multi-head
    latent attention (model.mla; num_kv_heads and qkv_bias do not apply)."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """Multi-head latent attention sizes (model.attention = mla)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen); the output projection has none."""
    mtp_depth: int = 0
    """Multi-token prediction modules (DeepSeek-V3): module k predicts token i+k+1 from module k-1's hidden
    state and the embedding of token i+k, through one more decoder block; embedding and output head shared.
    0 = off."""
    mtp_loss_coef: float = 0.3
    """Weight lambda of the MTP loss: lambda / mtp_depth * sum_k (mean cross-entropy of module k)."""


@dataclass
class ParallelConfig:
    """How the world is split. Sizes of 1 mean "not used". The data-parallel size is what is left."""

    tp: int = 1
    """Tensor-parallel size (innermost ranks)."""
    pp: int = 1
    """Pipeline-parallel stages (outermost ranks)."""
    ep: int = 1
    """Expert-parallel size, carved from the data-parallel ranks; must divide moe.num_experts."""
    dp: Optional[int] = None
    """Data-parallel size; null = world_size / (tp * pp). If set it must equal that quotient
    (= dp_pair * dp_node * dp_inter)."""
    dp_pair: int = 1
    """Innermost data-parallel level (ranks right after tp, e.g. the two GCDs of an MI250X); 1 = unused."""
    dp_node: int = 1
    """Middle data-parallel level (e.g. the GPU pairs of one node); 1 = unused."""
    dp_inter: Optional[int] = None
    """Outermost data-parallel level (e.g. the nodes); null = dp / (dp_pair * dp_node)."""
    ranks_per_node: Optional[int] = None
    """Ranks that share a machine; null = LOCAL_WORLD_SIZE from torchrun. Set it to make one machine
    act as several nodes (tests, emulated clusters). Must divide the world size."""
    sequence_parallel: bool = False
    """Split norm/dropout activations along the sequence between TP regions (needs tp > 1)."""
    tp_overlap_chunks: int = 1
    """Split each row-parallel linear (attention output, MLP w2) into this many GEMM chunks whose
    reduce-scatter (sequence parallel) or all-reduce runs asynchronously while the next chunk is
    computed. Under sequence parallel also the column-parallel entry of attention (q/k/v) and of the
    dense MLP (w1/w3): one fused op all-gathers the sequence in this many pieces, the gather of the
    next piece in flight while the current piece's GEMMs run (backward: the grad-input reduce-scatter
    of a piece flies during its weight-gradient GEMMs). Without SP the column-parallel input needs no
    gather and is unchanged. 1 = the unchunked layers (exact, unchanged code path). >1 needs tp > 1
    and data.seq_len divisible by tp * tp_overlap_chunks (SP), or micro_batch_size * seq_len
    divisible by it (no SP)."""
    ep_overlap_chunks: int = 1
    """Expert parallel: after routing on the whole micro-batch, split the kept assignments by token range
    into this many chunks and pipeline them, so one chunk's dispatch / combine all-to-all runs
    asynchronously while another chunk's experts compute (forward and backward). 1 = the unchunked
    dispatcher (exact, unchanged code path). >1 needs ep > 1; routing, capacity and aux losses unchanged."""
    microbatches: Optional[int] = None
    """Pipeline micro-batches per step; null = gradient-accumulation steps. Used with pp > 1."""
    pp_schedule: PPSchedule = PPSchedule["1f1b"]
    """Pipeline schedule (torch.distributed.pipelining): gpipe, 1f1b, interleaved_1f1b (needs
    pp_virtual_stages >= 2), interleaved_zero_bubble, zbv_zero_bubble (pp_virtual_stages = 2). Used with pp > 1."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank (model chunks); > 1 only with the interleaved / zero-bubble schedules."""
    pp_partition: PPPartition = PPPartition.uniform
    """How layers are split into stages: uniform (equal layer counts) or balanced (minimise the slowest
    stage's cost: training FLOPs + parameters per layer, embedding and head counted)."""
    backend: Backend = Backend.auto
    """Process-group backend: auto (nccl on CUDA/ROCm devices, gloo on CPU), nccl or gloo."""
    timeout_s: float = 600.0
    """Collective timeout; a rank waiting longer fails with an error instead of hanging."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    decay_steps: Optional[int] = None
    """Steps of cosine decay after warmup; null = trainer.max_steps - warmup_steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay; not applied to norms and biases."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: Optional[bool] = None
    """Use torch's fused AdamW kernel; null = use it where the device supports it. Same results."""


@dataclass
class DataConfig:
    """Pretraining data in Megatron .bin/.idx format, read through megatron-core's dataset classes."""

    paths: List[str] = field(default_factory=list)
    """Megatron data prefixes (path without .bin/.idx), optionally weighted like Megatron's
    --data-path: ["0.7", "/data/a", "0.3", "/data/b"]. Empty = the bundled corpus (built from
    text that ships with Python on first use, then cached in cache_dir)."""
    split: str = "969,30,1"
    """Train/valid/test split weights of the documents, as in Megatron."""
    tokenizer: str = "byte"
    """`byte` (built-in byte-level tokenizer, 257 ids) or a path to a Hugging Face tokenizer.json."""
    cache_dir: str = "~/.cache/shardwise"
    """Where the bundled corpus and megatron-core's index caches are written."""
    seq_len: int = 256
    """Tokens per sample."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank; steps accumulate global/(micro*dp) micro-batches."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    eod_mask_loss: bool = False
    """Do not train on predicting the end-of-document token."""
    verify: bool = False
    """Check every data file completely before training (index consistency, .bin size, every token id <
    the tokenizer's vocabulary), naming the file and document of the first problem. Reads all the data once
    per rank at start-up; for large data run `scripts/preprocess_data.py --verify PREFIX...` once instead."""


@dataclass
class TrainerConfig:
    """The training loop."""

    max_steps: int = 100
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed for model init, data order and dropout; same seed + global batch = same losses."""
    log_every: int = 1
    """Log metrics every N steps."""
    eval_every: int = 0
    """Evaluate on the validation split every N steps; 0 = never."""
    eval_iters: int = 4
    """Micro-batches per evaluation, over all data-parallel ranks (a fixed set: same loss at any dp size)."""
    precision: Precision = Precision.fp32
    """`fp32` or `bf16`. bf16: compute in bf16 under autocast; the ZeRO engine's compute parameters, gathers and
    gradient reductions follow it (zero.param_dtype / zero.reduce_dtype `auto`); master weights, gradient
    accumulators and optimizer states stay fp32."""
    device: Device = Device.auto
    """`auto` (cuda when available, else cpu), `cpu` or `cuda`."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU; null = a table of known GPUs, or a matmul probe on CPU."""
    init_from: str = ""
    """A local Hugging Face directory (llama, mixtral, qwen2_moe, deepseek_v2/v3; config.json + safetensors)
    whose weights initialise the model instead of the seed; each rank reads only its own slices (shardwise.models.hf_init). The run's
    model config must match the directory's (the model YAML `scripts/convert_hf.py import` writes). Or a shardwise
    durable checkpoint (a step_* directory, a checkpoint_dir or a run directory: its newest checkpoint): its
    weights only, the optimizer and the step start fresh (shardwise.fault_tolerance.weights). A durable
    checkpoint or snapshot to resume from takes precedence. Empty = initialise from trainer.seed."""
    memory_budget_gib: float = 0.0
    """Memory of one device (GiB) that a rank's model states (parameters, gradients, fp32 masters, AdamW
    moments; shardwise.parallel.share) must fit in; `shardwise-validate` builds each pipeline stage's share
    on the meta device and refuses the layout with the number when it does not fit. 0 = no check."""
    deterministic: bool = True
    """Use deterministic kernels (needed for bit-identical restarts)."""
    activation_checkpointing: str = "none"
    """Recompute transformer blocks in backward instead of keeping their activations (torch.utils.checkpoint,
    non-reentrant, one block = one checkpoint): `none`, `full` (every block) or `every:N` (blocks whose global
    index is a multiple of N: 0, N, 2N, ...; every:1 = full). Same results as `none` (exact in fp32) at any
    layout (TP/SP, PP, EP, ZeRO-3), about one extra forward of the marked blocks per step."""
    # --- observability (docs/observability.md): phase timers, stragglers, hangs, profiler ---
    phase_timing: bool = True
    """Time the phases of every step on every rank (data, forward, backward, grad_reduce, optimizer, snapshot) and
    find the slowest/fastest rank per phase with one small world-wide all-gather per step: metrics
    `straggler.<phase>.max_rank/.max_s/.min_s/.median_s`. false = none of it (no extra collective)."""
    straggler_factor: float = 2.0
    """A rank whose step time outside collective waits exceeds this times the median rank's for
    trainer.straggler_steps consecutive steps is reported (rank, host, phase). 0 = never report."""
    straggler_steps: int = 3
    """k: consecutive slow steps before a rank is reported as a straggler."""
    hang_timeout_s: float = 0.0
    """> 0: every rank heartbeats (step, phase, last collective entered) to run_dir/heartbeats and
    shardwise-launch's watchdog ends the job when no rank made progress for this long, naming the rank(s) that
    did not arrive and the collective the others wait in, with every rank's Python stack in run_dir/stacks.
    0 = off (the process group's parallel.timeout_s is then the only limit)."""
    profile_steps: List[int] = field(default_factory=list)
    """[a, b]: record steps a..b (inclusive) with torch.profiler and write one Chrome trace per rank to
    run_dir/profile/rank<r>.json, with ranges named after the phases and the ZeRO units. [] = off."""
    save_final: bool = True
    """Write a durable checkpoint of the last step when training ends, and of the current step when it is
    stopped (SIGTERM, Ctrl-C), into fault_tolerance.checkpoint_dir (default <run_dir>/checkpoints). Layouts the
    durable checkpoint does not cover yet (parallel.pp > 1, parallel.ep > 1) skip it with one log line."""
    keep_last: int = 0
    """Keep only the newest N committed checkpoints of the checkpoint directory; older ones are deleted after a
    new one has committed. 0 = keep every checkpoint."""
    resume: ResumeMode = ResumeMode.auto
    """Where the run starts: `auto` = the newest checkpoint of the checkpoint directory if there is one, else step
    0 (both logged; a warning if fault_tolerance.checkpoint_dir was given but does not exist); `must` = the same,
    but no checkpoint is an error; `never` = step 0 even if checkpoints exist. In-memory snapshots after a worker
    restart take precedence."""
    resume_from: Optional[str] = None
    """A checkpoint to start from instead of the checkpoint directory's newest: a step_* directory, or a directory
    of them (its newest). Nothing committed there is an error. null = the checkpoint directory."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    console: bool = True
    """One-line logs on rank 0."""
    progress_bar: bool = True
    """A progress bar on rank 0 (only when stdout is a terminal)."""
    wandb: bool = False
    """Log to Weights & Biases (honours WANDB_MODE=offline)."""
    wandb_project: str = "shardwise"
    """wandb project."""
    wandb_entity: Optional[str] = None
    """wandb entity (team); null = your default."""


@dataclass
class ShardwiseConfig:
    """The whole config; `recipe=NAME` picks a file under recipes/recipe/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    co2: CO2Config = field(default_factory=CO2Config)
    run_dir: Optional[str] = None
    """Output directory of this run (metrics.jsonl, config.yaml); null = runs/<recipe>/<run id>."""


GROUPS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "logging": LoggingConfig,
    "zero": ZeroConfig,
    "fault_tolerance": FaultToleranceConfig,
    "offload": OffloadConfig,
    "co2": CO2Config,
}


def register_schemas() -> None:
    """Register the schema so that YAML files can extend `<group>/schema` and be type-checked."""
    cs = ConfigStore.instance()
    cs.store(name="shardwise_schema", node=ShardwiseConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)
