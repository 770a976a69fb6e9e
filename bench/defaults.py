"""Values the command-line parsers show (defaults, bounds, names), defined here once and importable without torch.

`python -m bench --help`, `--version` and argument errors import nothing heavy: the parsers read these values from
here, and bench.measure / bench.precision re-export them (`from bench.measure import MAX_SEED` keeps working).
Standard library only: nothing here may import torch, numpy, ray, pandas, ... (tests/test_cli_instant.py).
"""

# --- bench.measure: the seed scheme, the bounds of the counts a user sets, the defaults of `run` and bench-* ---
# (bench.measure_config.MeasureConfig declares each measurement setting with these bounds and defaults)
SEED_MULTIPLIER = 1000003
SEED_SCHEME = ("labels[i] = i % num_classes; batch b holds images b*B .. b*B+B-1 and is sampled with "
               f"torch.Generator(device).manual_seed(seed * {SEED_MULTIPLIER} + b)")
MAX_SEED = 2 ** 40          # batch seeds stay far below 2**63
# Upper bounds of the counts a user sets: beyond them a run would not finish (or not fit in memory), never useful.
MAX_WARMUP_BATCHES = 1000
MAX_TIMING_ROUNDS = 1000
MAX_BOOTSTRAP = 100_000
MAX_THREADS = 512           # torch crashes (SIGSEGV) when asked for 100000 intra-op threads
MAX_REFERENCE_COUNT = 1_000_000   # more reference images than any FID protocol uses (ImageNet: 50k)
MAX_RESOLVE_PCT = 100.0     # --resolve: a target half-width beyond dense FID itself resolves nothing
DEFAULT_BATCH_SIZE = 50
DEFAULT_FLOP_IMAGES = 1
DEFAULT_TIMING_ROUNDS = 6    # paired ABBA rounds against dense (bench.timing.PAIRED_PROTOCOL)
QUALITY_METRICS = ("fid", "isc", "prc", "kid")

# --- bench.precision: `--dtype` names; each short name's torch dtype is torch.<long name> (fp32: no autocast) ---
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}   # long (bench-moe's spelling) -> short
DTYPE_NAMES = tuple(DTYPE_ALIASES.values())                                  # fp32, bf16, fp16
DEFAULT_DTYPE = "fp32"

# --- bench.tracking: `--track` backends of `run` and `sweep` (each row also recorded as one run there) ---
TRACKING_BACKENDS = ("mlflow", "wandb", "tensorboard")
