"""Sweeps: grids of (model, method, parameters) points, each measured by one Ray Tune trial (schema: spec.py).

    spec     the sweep spec: a sweep YAML read, checked against its schema, and changed by `quick:`/`--set`
    trials   trial expansion: the spec as trials in run order, and the checks they need before running
    store    the sweep store and resume: manifests and rows of each invocation, and which one a run continues
    process  a trial's process: what the trial and its generation workers set up alike (trial_setup)
    runner   the Ray runner: pending trials as Ray Tune grids, one results row per trial
    workers  generation workers: Ray actors generating batches of one large trial alongside it
"""
from bench.sweep.spec import (MEASURE_KEYS, SAMPLING_KEYS, TOP_DEFAULTS, absolutize_paths, apply_override,
                              compact_keys, import_modules, list_sweeps, load_spec, measure_config, method_params,
                              model_key, normalize, parse_sets, read_yaml, sweep_name, sweep_path, sweeps_dir,
                              valid_keys)
from bench.sweep.trials import (Trial, derive_twin_params, expand, load_bundle, sampling_for, validate_trials,
                                value_text)
from bench.sweep.store import (MANIFEST_DIR, SPEC_VERSION, Invocation, ensure_manifest, latest_sweep_id_in_rows,
                               manifest_dir, manifest_for, new_sweep_id, plan, read_manifests, resolve_invocation,
                               spec_fingerprint, stored_rows, validate_invocation, write_manifest)
from bench.sweep.runner import (GENERATION_MIN_SAMPLES, SweepRunner, TrialProgress, check_address, connect_ray,
                                generation_worker_count, resources, run_trial, trial_line, trial_threads,
                                tune_progress)

__all__ = [
    "MEASURE_KEYS", "SAMPLING_KEYS", "TOP_DEFAULTS", "absolutize_paths", "apply_override", "compact_keys",
    "import_modules", "list_sweeps", "load_spec", "measure_config", "method_params", "model_key", "normalize",
    "parse_sets", "read_yaml", "sweep_name", "sweep_path", "sweeps_dir", "valid_keys",
    "Trial", "derive_twin_params", "expand", "load_bundle", "sampling_for", "validate_trials",
    "value_text",
    "MANIFEST_DIR", "SPEC_VERSION", "Invocation", "ensure_manifest", "latest_sweep_id_in_rows", "manifest_dir",
    "manifest_for", "new_sweep_id", "plan", "read_manifests", "resolve_invocation", "spec_fingerprint",
    "stored_rows", "validate_invocation", "write_manifest",
    "GENERATION_MIN_SAMPLES", "SweepRunner", "TrialProgress", "check_address", "connect_ray",
    "generation_worker_count", "resources", "run_trial", "trial_line", "trial_threads", "tune_progress",
]
