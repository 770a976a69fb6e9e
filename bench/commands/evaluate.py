"""`python -m bench evaluate`: the quality certificate of a model (the README's numbers for the shipped default).

bench/certificate.py scores dense samples, real held-out images (the floor) and an untrained VAR (the ceiling)
against one held-out reference; this command parses the flags, prints the table and writes --out."""
from __future__ import annotations

from bench.benchmarks.jsonfile import write_json
from bench.commands._common import (add_model_args, add_sampling_args, bundle_from_args, check_flags,
                                    check_writable_file, sampling_from_args)
from bench.defaults import MAX_BOOTSTRAP, MAX_SEED

ORDER = 35


def register(sub):
    p = sub.add_parser("evaluate", help="quality certificate of a model: FID and class accuracy of dense samples vs "
                                        "real held-out images, real-vs-real floor, untrained-model ceiling")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--samples", type=int, default=1000, help="images per set (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="batch b of the samples uses seed+b; also seeds the "
                                                       "untrained VAR and the bootstrap")
    p.add_argument("--batch-size", type=int, default=100, help="generation batch size")
    p.add_argument("--reference", default=None, help="reference set (default: the model's held-out 'val' split): "
                   "an image folder or an .npz with mu/sigma and/or arr_0")
    p.add_argument("--reference-count", type=int, default=None,
                   help="held-out real reference images (default: shapes 5000, a folder's whole 'val' split)")
    p.add_argument("--inception-weights", default=None, help="use Inception-v3 with these weights as extractor")
    p.add_argument("--bootstrap", type=int, default=100, help="FID bootstrap resamples (0: no interval)")
    p.add_argument("--classifier", default=None, help="quality classifier .safetensors (default: the model's)")
    p.add_argument("--out", default=None, help="also write all numbers to this .json")
    p.set_defaults(func=run)


def _fmt(x, spec=".3f"):
    import math
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_certificate(cert: dict) -> None:
    print(f"quality certificate: {cert['model_id']} | {cert['samples']} images per set | reference "
          f"{cert['reference']} | extractor {cert['extractor']}")
    head = f"{'set':<52}{'FID':>9}{'95% interval':>21}{'prec':>7}{'recall':>8}{'KID':>9}{'IS':>7}{'cls acc':>9}"
    print(head)
    print("-" * len(head))
    for r in cert["rows"].values():
        if not r["images"]:
            print(r["set"])
            continue
        ci = f"[{_fmt(r['fid_ci_low'])}, {_fmt(r['fid_ci_high'])}]"
        print(f"{r['set']:<52}{_fmt(r['fid']):>9}{ci:>21}{_fmt(r['precision']):>7}{_fmt(r['recall']):>8}"
              f"{_fmt(r['kid_mean']):>9}{_fmt(r['isc_mean'], '.2f'):>7}{_fmt(r['classifier_accuracy']):>9}")
    print(f"FID interval: class-stratified bootstrap ({cert['bootstrap']} resamples) of each set against the fixed "
          f"reference; seeds: batch b of the samples uses {cert['seed']}+b")


def run(a):
    from bench.certificate import quality_certificate   # lazy: --help stays instant (no torch)
    # every input before generating anything
    check_flags(a, samples=(2, None, " (FID needs a covariance)"), seed=(0, MAX_SEED), batch_size=(1,),
                bootstrap=(0, MAX_BOOTSTRAP))
    if a.out:
        check_writable_file(a.out, (".json",), "--out")
    bundle = bundle_from_args(a)
    cert = quality_certificate(bundle, samples=a.samples, seed=a.seed, batch_size=a.batch_size,
                               sampling=sampling_from_args(a, bundle), reference=a.reference,
                               reference_count=a.reference_count, inception_weights=a.inception_weights,
                               bootstrap=a.bootstrap, classifier=a.classifier)
    print_certificate(cert)
    if a.out:
        write_json(a.out, cert)
        print(f"wrote {a.out}")
    return 0
