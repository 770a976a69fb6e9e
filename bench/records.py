"""Typed measurement records (optimum-benchmark style): each phase of a measurement returns one record; their fields,
with dtype and meaning in the field metadata, generate bench.results.SCHEMA, and each record logs its own summary.

    flops = FlopsRecord(macs_fvcore=..., ...)
    flops.log()                      # one line through the var_bench logger
    row.update(flops.row())          # its columns
    schema_of(*RECORDS)              # {column: (dtype, meaning)}, in row order

dtypes: string, int64, float64, bool, list<float64>, list<int64>, json (a string holding JSON). A field is null
where its `nullable` metadata says when, and where its phase was switched off: timing_rounds 0 (the paired timing
columns), flop_images 0 (fvcore's counts), a quality metric not requested or without the reference it needs (its
columns), bootstrap 0 (the intervals). Otherwise a measured row's column holds a finite value; a non-finite number
is stored as null (bench.results), never as NaN.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from bench.log import get_logger

logger = get_logger(__name__)
OUTSIDE_A_SWEEP = "null outside a sweep (a `run`)"


def column(dtype: str, meaning: str, nullable: str = ""):
    """A record field: its results dtype, what it means, and (if it may be null) when."""
    return field(default=None, metadata=dict(dtype=dtype, meaning=meaning, nullable=nullable))


class Record:
    """Base of the records: columns as a dict, the schema of the class, a summary line."""

    def row(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def schema(cls) -> Dict[str, tuple]:
        return {f.name: (f.metadata["dtype"], f.metadata["meaning"]) for f in fields(cls)}

    @classmethod
    def nullable(cls) -> Dict[str, str]:
        return {f.name: f.metadata["nullable"] for f in fields(cls) if f.metadata["nullable"]}

    def summary(self) -> str:
        return ""

    def log(self) -> None:
        text = self.summary()
        if text:
            logger.info(text)


@dataclass
class RunIdentity(Record):
    """Which run: its id and the sweep trial it belongs to."""
    run_id: Optional[str] = column("string", "unique id of the run (UTC start time + random suffix)")
    sweep: Optional[str] = column("string", "sweep name ('' for a single `bench run`)")
    sweep_id: Optional[str] = column("string", "id of the sweep invocation that produced the row ('' if none)")
    trial_key: Optional[str] = column("string",
        "key the row is stored under; re-running the trial replaces the row ('' if none)")


@dataclass
class MethodSetup(Record):
    """The method and its validated parameters."""
    method: Optional[str] = column("string", "registered method name (bench.registry)")
    method_kind: Optional[str] = column("string", "none | weight | token | weight+token")
    method_label: Optional[str] = column("string", "short human-readable method identity (legends)")
    method_config: Optional[str] = column("json", "the validated method parameters, JSON object")


@dataclass
class RunSetup(Record):
    """The model, sample design and sampling settings."""
    model: Optional[str] = column("string", "model name (embedded name, 'tiny', or official-d<depth>)")
    model_id: Optional[str] = column("string", "stable model id (name + weight hash; official: + VQ-VAE hash) used in cache keys")
    model_depth: Optional[int] = column("int64", "VAR depth (transformer blocks)")
    model_source: Optional[str] = column("string", "embedded | official | builtin")
    samples: Optional[int] = column("int64", "number of generated images N (quality and timing use all of them)")
    seed: Optional[int] = column("int64", "base seed")
    seed_scheme: Optional[str] = column("string",
        "how labels and per-batch seeds derive from the seed (exact formula)")
    batch_size: Optional[int] = column("int64", "images per generation batch B")
    cfg: Optional[float] = column("float64", "classifier-free guidance strength")
    top_k: Optional[int] = column("int64", "top-k sampling (0 = off)")
    top_p: Optional[float] = column("float64", "top-p sampling (0 = off)")
    more_smooth: Optional[bool] = column("bool", "Gumbel smoothing (visualisation only)")
    device: Optional[str] = column("string", "torch device the run used (cpu, cuda, cuda:1 ...)")
    dtype: Optional[str] = column("string", "fp32 | bf16 | fp16: autocast of the transformer forward in every "
                                  "generation of the run, dense reference and paired dense batches included "
                                  "(fp32: none; sampling and VQ-VAE decode always float32; bench/precision.py)")


@dataclass
class FlopsRecord(Record):
    """Multiply-accumulates per image (bench/flops.py, bench/analytic.py)."""
    macs_fvcore: Optional[float] = column("float64",
        "transformer MACs per image counted by fvcore over the real generation (CFG rows included; decoder "
        "excluded; expert layers traced on the grouped path, so the routed work)")
    macs_fvcore_per_scale: Optional[List[float]] = column("list<float64>", "fvcore MACs per image, one per scale")
    macs_decoder: Optional[float] = column("float64", "VQ-VAE decoder MACs per image (fvcore)")
    macs_total: Optional[float] = column("float64", "macs_fvcore + macs_decoder")
    macs_analytic: Optional[float] = column("float64",
        "transformer MACs per image by formula (bench/analytic.py or the method's analytic_macs) on the same "
        "flop_images images")
    macs_analytic_per_scale: Optional[List[float]] = column("list<float64>",
        "analytic MACs per image, one per scale (same images)")
    macs_fvcore_over_analytic: Optional[float] = column("float64",
        "macs_fvcore / macs_analytic (1.0 = exact agreement)")
    macs_analytic_all: Optional[float] = column("float64",
        "analytic MACs per image over all N generated images (method statistics of the whole run): the routed "
        "work, as the papers count (expert layers: the selected (token, expert) pairs), whichever path ran")
    macs_analytic_all_per_scale: Optional[List[float]] = column("list<float64>", "the same, per scale")
    macs_executed_all: Optional[float] = column("float64",
        "the same MACs as the kernels executed them: expert layers count every expert on masked-dense calls and "
        "the padded slots of CUDA's padded bmm (expert_paths); equal to macs_analytic_all without experts")
    macs_uncounted_ops: Optional[str] = column("json",
        "ops seen in the trace with no MAC handler (elementwise, norms ...): {op: occurrences}; 'decoder:' "
        "prefix for the decoder")
    macs_dynamic_ops: Optional[str] = column("json",
        "dynamic data-movement ops counted as 0 MACs (gather, index, sort, topk, embedding ...): {op: "
        "occurrences}")
    flop_images: Optional[int] = column("int64",
        "images of the counted generation (labels 0..flop_images-1, seed of batch 0)")
    expert_paths: Optional[str] = column("json",
        "expert-FFN execution of the generation (N samples + paired rounds), methods/_experts.py: {\"calls\": "
        "{grouped|masked-dense: calls}, \"chooser\": auto (cost model) | forced}; masked-dense calls run (and "
        "count) every expert's MACs", nullable="methods without experts")

    def summary(self) -> str:
        if self.macs_fvcore is None:
            return "flops: not counted (flop_images 0)"
        ratio = self.macs_fvcore_over_analytic or float("nan")
        return (f"flops: {self.macs_fvcore / 1e9:.4g} GMACs/image transformer (fvcore), {self.macs_analytic / 1e9:.4g} "
                f"analytic (ratio {ratio:.4f}), decoder {self.macs_decoder / 1e9:.4g} GMACs/image, "
                f"{self.flop_images} image(s) counted")



@dataclass
class TimingRecord(Record):
    """Absolute wall-clock of this trial's batches (not comparable across trials)."""
    time_median_s: Optional[float] = column("float64",
        "median seconds per full batch: transformer + sampling + decode")
    time_p10_s: Optional[float] = column("float64", "10th percentile of seconds per batch")
    time_p90_s: Optional[float] = column("float64", "90th percentile of seconds per batch")
    time_per_scale_median_s: Optional[List[float]] = column("list<float64>",
        "median seconds per batch of each scale (transformer + sampling + residual update)")
    time_decode_median_s: Optional[float] = column("float64", "median seconds per batch of the VQ-VAE decode")
    images_per_s: Optional[float] = column("float64", "timed images / timed seconds")
    timing_batches: Optional[int] = column("int64", "batches in the time statistics (after warm-up)")
    warmup_batches: Optional[int] = column("int64", "leading batches excluded from the time statistics")
    timing_extra_batches: Optional[int] = column("int64",
        "batches run for timing only, outputs discarded: repeats of the last batch when N/B <= warmup_batches, "
        "and both batches of each paired round the N samples did not provide")
    timer: Optional[str] = column("string", "perf_counter (CPU) | cuda_events (GPU, synchronised per batch)")
    resumed_batches: Optional[int] = column("int64",
        "batches of the N samples read back from a killed run's checkpoints (bench/resume.py) or, for dense, from "
        "the dense reference an earlier point made (bench.dense_cache.generation_store), not generated here; time, "
        "memory and the method's statistics cover only the batches generated by this run")
    worker_batches: Optional[int] = column("int64",
        "batches of the N samples generated by other worker processes (a sweep's --generation-workers), not by "
        "the measuring process; like resumed batches they are not timed and not in the method's statistics")

    def summary(self) -> str:
        return (f"time: median {self.time_median_s:.4g} s/batch, {self.images_per_s:.4g} images/s "
                f"({self.timing_batches} timed batches, {self.timer})"
                + (f"; {self.resumed_batches} batches resumed from checkpoints (not timed)" if self.resumed_batches
                   else "")
                + (f"; {self.worker_batches} batches generated by other workers (not timed)" if self.worker_batches
                   else ""))



@dataclass
class PairedTimingRecord(Record):
    """Time paired with dense inside the trial (bench.timing.PAIRED_PROTOCOL)."""
    speedup: Optional[float] = column("float64",
        "median over paired rounds of t_dense / t_method, same labels and seeds, ABBA order (1 by definition "
        "for dense)")
    speedup_ci_low: Optional[float] = column("float64",
        "percentile-bootstrap 95% interval of the speedup over rounds, low end")
    speedup_ci_high: Optional[float] = column("float64", "the same, high end")
    speedup_per_scale: Optional[List[float]] = column("list<float64>",
        "median over rounds of t_dense / t_method of each scale")
    speedup_aa: Optional[float] = column("float64",
        "dense rows: dense timed against itself (A/A), the protocol's noise floor", nullable="dense rows only")
    speedup_aa_ci_low: Optional[float] = column("float64", "A/A interval, low end", nullable="dense rows only")
    speedup_aa_ci_high: Optional[float] = column("float64", "A/A interval, high end", nullable="dense rows only")
    timing_rounds: Optional[int] = column("int64", "paired rounds (0: paired timing off)")
    timing_protocol: Optional[str] = column("string", "the paired timing protocol, in words")
    time_paired_method_median_s: Optional[float] = column("float64",
        "median seconds of the method's batches in the rounds")
    time_paired_dense_median_s: Optional[float] = column("float64", "median seconds of dense's batches in the rounds")
    macs_ratio: Optional[float] = column("float64", "macs_analytic_all / dense transformer MACs per image")
    macs_executed_ratio: Optional[float] = column("float64", "macs_executed_all / dense transformer MACs per image")
    time_flop_efficiency: Optional[float] = column("float64",
        "time saved / FLOPs saved = (1 - 1/speedup) / (1 - macs_ratio); 1.0 is the physical limit (null when "
        "the MACs change by < 1%)",
        nullable="null when the MACs change by less than 1% (dense; DMoE where its router costs what its experts save)")
    timing_cv: Optional[float] = column("float64",
        "coefficient of variation of the round laps (the larger of method's and dense's)")
    load_avg_before: Optional[float] = column("float64", "1-min load average before the timing")
    load_avg_after: Optional[float] = column("float64", "1-min load average after the timing")
    cpu_utilization: Optional[float] = column("float64", "process CPU time / (wall x threads) over the timing")
    timing_noisy: Optional[bool] = column("bool",
        "the machine was busy or the laps erratic while timing (timing_noisy_rule)")
    timing_noisy_reason: Optional[str] = column("string", "which clauses of the rule fired ('' if none)")
    timing_noisy_rule: Optional[str] = column("string", "the rule of timing_noisy, in words")

    def summary(self) -> str:
        if not self.timing_rounds:
            return "paired timing: off (timing_rounds 0)"
        aa = self.speedup_aa is not None
        sp, lo, hi = ((self.speedup_aa, self.speedup_aa_ci_low, self.speedup_aa_ci_high) if aa else
                      (self.speedup, self.speedup_ci_low, self.speedup_ci_high))
        return (f"paired timing ({self.timing_rounds} ABBA rounds): {'speedup_aa' if aa else 'speedup'} {sp:.3f} "
                f"[{lo:.3f}, {hi:.3f}], MACs ratio {self.macs_ratio:.3f}"
                + (f"; noisy: {self.timing_noisy_reason}" if self.timing_noisy else ""))



@dataclass
class MemoryRecord(Record):
    """Peak memory of a generation batch (bench/memory.py)."""
    mem_peak_bytes: Optional[int] = column("int64",
        "peak memory of a generation batch (max over batches), see mem_kind")
    mem_kind: Optional[str] = column("string",
        "cuda_max_allocated | cpu_rss_growth_hwm | cpu_rss_growth_sampled | unavailable")
    kv_cache_bytes_peak: Optional[int] = column("int64",
        "bytes per image held in the attention K/V caches after the last scale's append (the largest cache), by "
        "formula from what the method keeps (Method.kv_cache_bytes): Σ over layers of 2 (K and V) x cached "
        "positions x width x element size (the mean of K's and V's as stored under --dtype on the run's device, "
        "probed: 4 in fp32) x rows per image (2 under CFG)")

    def summary(self) -> str:
        peak = "n/a" if self.mem_peak_bytes is None else f"{self.mem_peak_bytes / 2**20:.1f} MiB"
        kv = "" if self.kv_cache_bytes_peak is None else f", KV cache {self.kv_cache_bytes_peak / 2**10:.1f} KiB/image"
        return f"peak memory {peak} ({self.mem_kind}){kv}"



@dataclass
class QualityRecord(Record):
    """Quality of the N images against the reference (bench/quality.py)."""
    fid: Optional[float] = column("float64", "Fréchet distance to the reference set in the extractor's feature space")
    fid_ci_low: Optional[float] = column("float64", "bootstrap interval at quality_level (default 95%), low end")
    fid_ci_high: Optional[float] = column("float64", "the same, high end")
    isc_mean: Optional[float] = column("float64", "Inception score (extractor's classes)")
    isc_std: Optional[float] = column("float64", "Inception score std over splits")
    precision: Optional[float] = column("float64", "improved precision (k-NN manifolds)")
    recall: Optional[float] = column("float64", "improved recall")
    kid_mean: Optional[float] = column("float64", "kernel inception distance")
    kid_std: Optional[float] = column("float64", "KID std over subsets")
    extractor: Optional[str] = column("string", "feature extractor of the quality metrics")
    reference: Optional[str] = column("string", "reference set the metrics compare against")
    reference_count: Optional[int] = column("int64", "images in the reference set")
    reference_cached: Optional[bool] = column("bool", "reference statistics came from the disk cache")
    class_accuracy: Optional[float] = column("float64", "share of the samples the model's classifier assigns to "
                                             "their conditioning class", nullable="null with the Inception extractor "
                                             "(its classes are not the model's)")
    reference_split: Optional[str] = column("string", "held-out reference sample as JSON: data identity, split, seed "
                                            "and per-class counts (null for a folder or .npz given by path)",
                                            nullable="null for a reference given by path")

    def summary(self) -> str:
        nan = float("nan")
        f = lambda v: nan if v is None else v   # noqa: E731
        return (f"quality: fid {f(self.fid):.4g} [{f(self.fid_ci_low):.4g}, {f(self.fid_ci_high):.4g}] vs "
                f"{self.reference} (reference {'from cache' if self.reference_cached else 'computed and cached'})"
                + ("" if self.class_accuracy is None else f", class accuracy {self.class_accuracy:.3f}"))



@dataclass
class PairedQualityRecord(Record):
    """Quality paired with dense on the same labels and seeds (bench.quality.paired_fid_bootstrap)."""
    fid_delta: Optional[float] = column("float64",
        "FID(method) - FID(dense), same seeds, same reference (0 for dense)")
    fid_delta_ci_low: Optional[float] = column("float64",
        "paired class-stratified bootstrap interval at quality_level (same resample indices for both), low end")
    fid_delta_ci_high: Optional[float] = column("float64", "the same, high end")
    fid_delta_pct: Optional[float] = column("float64", "100 x fid_delta / FID(dense)")
    fid_delta_samples_for_1pct: Optional[int] = column("int64",
        "estimated N at which the fid_delta interval half-width reaches 1% of dense FID (1/sqrt(N) scaling; "
        "null when the interval is 0)", nullable="null when the ΔFID interval has zero width (dense)")
    precision_delta: Optional[float] = column("float64", "precision(method) - precision(dense), same seeds")
    precision_delta_ci_low: Optional[float] = column("float64",
        "paired class-stratified percentile bootstrap interval at quality_level of precision_delta over the "
        "generated samples' inside-the-reference-manifold indicators (same resample indices for both; reference "
        "balls fixed; [0, 0] for dense), low end")
    precision_delta_ci_high: Optional[float] = column("float64", "the same, high end")
    recall_delta: Optional[float] = column("float64", "recall(method) - recall(dense), same seeds")
    recall_delta_ci_low: Optional[float] = column("float64",
        "percentile bootstrap interval at quality_level of recall_delta over the reference points' "
        "inside-the-generated-manifold indicators (same reference indices for both arms), with both generated "
        "sets fixed: the reference-sample variability only, not the seeds' (narrower than a full interval; "
        "bench.quality.paired_quality; [0, 0] for dense), low end")
    recall_delta_ci_high: Optional[float] = column("float64", "the same, high end")
    isc_delta: Optional[float] = column("float64", "IS(method) - IS(dense), same seeds")
    class_accuracy_delta: Optional[float] = column("float64", "class_accuracy(method) - class_accuracy(dense), same "
                                                   "seeds", nullable="null with the Inception extractor")
    class_accuracy_delta_ci_low: Optional[float] = column("float64", "paired class-stratified bootstrap "
                                                          "interval at quality_level, low end",
                                                          nullable="null with Inception")
    class_accuracy_delta_ci_high: Optional[float] = column("float64", "the same, high end",
                                                           nullable="null with Inception")

    def summary(self) -> str:
        if self.fid_delta is None:
            return ""

        def interval(lo, hi, spec):   # no interval without bootstrap resamples (--bootstrap 0)
            return " (no interval)" if lo is None or hi is None else f" [{lo:{spec}}, {hi:{spec}}]"
        acc = "" if self.class_accuracy_delta is None else (
            f", class_accuracy_delta {self.class_accuracy_delta:+.3f}"
            + interval(self.class_accuracy_delta_ci_low, self.class_accuracy_delta_ci_high, "+.3f"))
        return (f"paired with dense: fid_delta {self.fid_delta:+.4g}"
                + interval(self.fid_delta_ci_low, self.fid_delta_ci_high, "+.4g") + acc)



@dataclass
class FidelityRecord(Record):
    """Same-seed fidelity against dense."""
    fidelity_token_agreement: Optional[float] = column("float64",
        "fraction of tokens equal to the dense run with the same seeds")
    fidelity_token_agreement_per_scale: Optional[List[float]] = column("list<float64>", "the same, per scale")
    fidelity_psnr_db: Optional[float] = column("float64",
        "mean over images of the per-image PSNR (dB, peak 1.0) against the dense image with the same seed and "
        "label (identical images count as 100 dB)")
    psnr_to_dense_ci_low: Optional[float] = column("float64",
        "percentile bootstrap interval at the run's level (quality_level) of fidelity_psnr_db over images, "
        "class-stratified ([estimate, estimate] when every per-image value is equal), low end")
    psnr_to_dense_ci_high: Optional[float] = column("float64", "the same, high end")
    ssim_to_dense: Optional[float] = column("float64",
        "mean over images of the per-image SSIM against the dense image with the same seed and label (torchmetrics "
        "structural_similarity_index_measure, data range 1, 11-px Gaussian window; identical images count 1)",
        nullable="null for images under 6 px on a side (SSIM's window)")
    ssim_to_dense_ci_low: Optional[float] = column("float64",
        "percentile bootstrap interval of ssim_to_dense as psnr_to_dense_ci_low, low end",
        nullable="null for images under 6 px on a side")
    ssim_to_dense_ci_high: Optional[float] = column("float64", "the same, high end",
                                                    nullable="null for images under 6 px on a side")
    dense_cache: Optional[str] = column("string",
        "dense reference outputs: reused (from the cache) | stored (this dense run) | generated (for this "
        "run, then cached)")


@dataclass
class ResolveRecord(Record):
    """Sample size as a target (bench/resolve.py): the looks of `--resolve` and why they stopped."""
    resolve_target_pct: Optional[float] = column("float64",
        "target half-width of the paired ΔFID interval, in % of dense FID", nullable="null without --resolve")
    resolved: Optional[bool] = column("bool",
        "the paired ΔFID interval reached the target half-width or excludes 0", nullable="null without --resolve")
    resolve_stop_reason: Optional[str] = column("string",
        "why the looks stopped: halfwidth (target reached) | excludes_zero (the difference is resolved) | "
        "max_samples (budget spent, not resolved)", nullable="null without --resolve")
    resolve_level: Optional[float] = column("float64",
        "confidence level of each look's intervals: 1 - 0.05/looks planned (Bonferroni over the fixed schedule), "
        "so that the interval at whichever look stops covers with >= 95%", nullable="null without --resolve")
    resolve_looks: Optional[str] = column("json",
        "the looks taken: [{samples, fid_delta, ci_low, ci_high, halfwidth_pct}] in order",
        nullable="null without --resolve")
    max_samples: Optional[int] = column("int64", "the sample budget of --resolve (the schedule's last look)",
                                        nullable="null without --resolve")

    def summary(self) -> str:
        if self.resolve_target_pct is None:
            return ""
        looks = json.loads(self.resolve_looks or "[]")
        n = looks[-1]["samples"] if looks else 0
        return (f"resolve ±{self.resolve_target_pct:g}%: {'resolved' if self.resolved else 'not resolved'} "
                f"({self.resolve_stop_reason}) after {len(looks)} look(s), {n} samples, level {self.resolve_level:.4f}")


@dataclass
class SweepRecord(Record):
    """The sweep trial a row measured and the Ray cluster it ran on (bench/sweep/runner.py); null outside a sweep."""
    sweep_point: Optional[str] = column("string", "the trial's point id: <model>/<entry>[/<axis>=<value>,...][/<twin>]",
                                        nullable=OUTSIDE_A_SWEEP)
    sweep_entry: Optional[str] = column("string", "the sweep YAML's points entry of the trial",
                                        nullable=OUTSIDE_A_SWEEP)
    sweep_twin: Optional[str] = column("string", "the twin's name ('' for a point that is not a twin)",
                                       nullable=OUTSIDE_A_SWEEP)
    sweep_parent: Optional[str] = column("string", "a twin's parent point id ('' for a point that is not a twin)",
                                         nullable=OUTSIDE_A_SWEEP)
    sweep_axes: Optional[str] = column("json", "the trial's grid values: {axis: value}", nullable=OUTSIDE_A_SWEEP)
    sweep_quick: Optional[bool] = column("bool", "the sweep ran in its --quick form", nullable=OUTSIDE_A_SWEEP)
    ray_address: Optional[str] = column("string", "the Ray cluster: local (a private one) or its address",
                                        nullable=OUTSIDE_A_SWEEP)
    ray_version: Optional[str] = column("string", "ray version of the driver", nullable=OUTSIDE_A_SWEEP)
    ray_num_cpus: Optional[float] = column("float64", "CPUs of the whole cluster", nullable=OUTSIDE_A_SWEEP)
    ray_nodes: Optional[int] = column("int64", "live nodes of the cluster", nullable=OUTSIDE_A_SWEEP)
    ray_cpus_per_trial: Optional[float] = column("float64", "CPUs each trial was given", nullable=OUTSIDE_A_SWEEP)
    ray_gpus_per_trial: Optional[float] = column("float64", "GPUs each trial was given", nullable=OUTSIDE_A_SWEEP)
    ray_concurrent_trials: Optional[int] = column("int64", "trials run at once", nullable=OUTSIDE_A_SWEEP)
    ray_generation_workers: Optional[int] = column("int64",
        "processes generating each trial's samples (the trial and its generation workers)", nullable=OUTSIDE_A_SWEEP)
    ray_node: Optional[str] = column("string", "host name of the node the trial ran on", nullable=OUTSIDE_A_SWEEP)


@dataclass
class EnvironmentRecord(Record):
    """The environment the run was measured in (bench/env.py)."""
    env_harness: Optional[str] = column("string", "var-bench version")
    env_torch: Optional[str] = column("string", "torch version")
    env_torch_fidelity: Optional[str] = column("string", "torch-fidelity version")
    env_fvcore: Optional[str] = column("string", "fvcore version")
    env_ray: Optional[str] = column("string", "ray version")
    env_python: Optional[str] = column("string", "python version")
    env_platform: Optional[str] = column("string", "OS / platform string")
    env_device_name: Optional[str] = column("string", "CPU model or GPU name")
    env_cuda_visible_devices: Optional[str] = column("string", "CUDA_VISIBLE_DEVICES as the run saw it (a Ray "
                                                     "trial: the GPUs Ray gave it; the run used the first)",
                                                     nullable="null on CPU, or when the variable is unset")
    env_threads: Optional[int] = column("int64", "torch intra-op threads")
    env_code_commit: Optional[str] = column("string", "git commit of the harness (-dirty if modified)")
    env_host: Optional[str] = column("string", "host name")


@dataclass
class RunTimes(Record):
    """When the measurement ran and where its time went."""
    started_at: Optional[str] = column("string", "UTC start, ISO 8601")
    finished_at: Optional[str] = column("string", "UTC end, ISO 8601")
    wall_s: Optional[float] = column("float64",
        "wall seconds of measure(): validation, FLOP count, generation, quality, dense reference")
    phase_s: Optional[str] = column("json", "wall seconds per phase of the measurement: {phase: seconds}")


# in row order; a row holds param_<name> columns after MethodSetup's and method extras (row_metrics) at the end
RECORDS = (RunIdentity, MethodSetup, RunSetup, FlopsRecord, TimingRecord, PairedTimingRecord, MemoryRecord,
           QualityRecord, PairedQualityRecord, FidelityRecord, ResolveRecord, SweepRecord, EnvironmentRecord, RunTimes)
PARAM_COLUMN = ("param_<name>", ("any", "one column per method parameter; scalars as is, lists as JSON strings"))


def schema_of(*records) -> Dict[str, tuple]:
    """{column: (dtype, meaning)} of the records, in order; the param_<name> family after MethodSetup."""
    out: Dict[str, tuple] = {}
    for rec in records:
        out.update(rec.schema())
        if rec is MethodSetup:
            out[PARAM_COLUMN[0]] = PARAM_COLUMN[1]
    return out


def nullable_of(*records) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for rec in records:
        out.update(rec.nullable())
    return out
